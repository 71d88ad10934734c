"""A loopback stand-in for the AWS Price List Query API's GetProducts, strict about requests
as the real one is.

    with PricingApi() as pricing:
        pricing.add("m6i.large", "us-east-1", 0.096)  # and decoys a query must not match
        subprocess.run(..., env={**os.environ, "AWS_ENDPOINT_URL_PRICING": pricing.url})

It speaks JSON 1.1 as ``api.pricing.us-east-1.amazonaws.com`` does: ``POST /`` with
``X-Amz-Target: AWSPriceListService.GetProducts``, a SigV4-signed request, errors as
``{"__type": ..., "message": ...}``; each PriceList item is one product's JSON text
(``product.attributes``, ``terms.OnDemand``/``Reserved``). It pages over the products it
holds, a few a page, filtering each page: a page may hold no match, and a client that does
not follow NextToken to the end misses prices.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import string
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn

from devtools.server_process import HOST

TARGET = "AWSPriceListService.GetProducts"
CONTENT_TYPE = "application/x-amz-json-1.1"
ACCESS_KEY = "testing"  # the access key id it knows (any secret key passes: no signature check)
REGIONS = {"us-east-1", "eu-central-1", "ap-south-1"}  # where the real API answers
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]+)/\d{8}/([^/]+)/([^/]+)/aws4_request, "
    r"SignedHeaders=[a-z0-9;-]+, Signature=[0-9a-f]{64}"
)
_MEMBERS = {"ServiceCode", "Filters", "FormatVersion", "NextToken", "MaxResults"}
# region code -> (location, usage type prefix), as the price list names them
_LOCATIONS = {
    "us-east-1": ("US East (N. Virginia)", ""),
    "eu-west-1": ("EU (Ireland)", "EU-"),
    "eu-central-1": ("EU (Frankfurt)", "EUC1-"),
}
# Products of the same type and region that an on-demand Linux query must not match.
DECOYS = [
    {"operatingSystem": "Windows", "operation": "RunInstances:0002"},
    {"tenancy": "Dedicated"},
    {"capacitystatus": "UnusedCapacityReservation"},
    {"preInstalledSw": "SQL Web", "operation": "RunInstances:0200"},
]
ON_DEMAND, RESERVED, HOURLY = "JRTCKXETXF", "4NA7Y494T4", "6YS6EN2CT7"  # the list's codes
_ONE_YEAR = {
    "LeaseContractLength": "1yr",
    "OfferingClass": "standard",
    "PurchaseOption": "No Upfront",
}


class ApiError(Exception):
    """Answered as a JSON 1.1 error document."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = 400, kind, message  # as the API's are

    def document(self) -> dict[str, str]:
        return {"__type": self.kind, "message": self.message}


class PricingApi:
    """The stand-in, the products it holds, and the GetProducts requests it answered."""

    def __init__(self, *, access_key: str = ACCESS_KEY, page_size: int = 3) -> None:
        self.access_key, self.page_size = access_key, page_size
        self.requests: list[dict[str, Any]] = []  # each GetProducts request body
        self._products: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((HOST, 0), _handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://{HOST}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> PricingApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def add(
        self,
        instance_type: str,
        region_code: str,
        usd_per_hour: float,
        *,
        decoys: bool = True,
        **attributes: str,
    ) -> None:
        """The on-demand Linux product of ``instance_type`` in ``region_code`` at
        ``usd_per_hour`` (``attributes`` override its own), and with ``decoys`` those of
        Windows, dedicated tenancy, an unused reservation and SQL Server, each dearer."""
        location, prefix = _LOCATIONS.get(region_code, (region_code, f"{region_code}-"))
        linux = {
            "servicecode": "AmazonEC2", "servicename": "Amazon Elastic Compute Cloud",
            "instanceType": instance_type, "instanceFamily": "General purpose",
            "regionCode": region_code, "location": location, "locationType": "AWS Region",
            "operatingSystem": "Linux", "preInstalledSw": "NA", "tenancy": "Shared",
            "licenseModel": "No License required", "capacitystatus": "Used",
            "marketoption": "OnDemand", "operation": "RunInstances",
            "usagetype": f"{prefix}BoxUsage:{instance_type}", "vcpu": "2", "memory": "8 GiB",
            "processorArchitecture": "64-bit", "currentGeneration": "Yes",
        }  # fmt: skip
        with self._lock:
            self._products.append(_product({**linux, **attributes}, usd_per_hour))
            for n, decoy in enumerate(DECOYS if decoys else [], start=2):
                self._products.append(_product({**linux, **attributes, **decoy}, usd_per_hour * n))

    def get_products(self, body: dict[str, Any]) -> dict[str, Any]:
        """One page of the products that match every filter (under the lock)."""
        _check(body)
        self.requests.append(body)
        filters = [(f["Field"], f["Value"]) for f in body.get("Filters", [])]
        start = self._start(body.get("NextToken"), filters)
        end = start + min(body.get("MaxResults", 100), self.page_size)
        page = [
            json.dumps(product)
            for product in self._products[start:end]
            if all(product["product"]["attributes"].get(k) == v for k, v in filters)
        ]
        answer: dict[str, Any] = {"FormatVersion": "aws_v1", "PriceList": page}
        if end < len(self._products):
            token = json.dumps({"at": end, "filters": filters}).encode()
            answer["NextToken"] = base64.b64encode(token).decode()
        return answer

    def _start(self, token: str | None, filters: list[tuple[str, str]]) -> int:
        """Where a NextToken goes on; it is good only for the query that it came from."""
        if token is None:
            return 0
        try:
            state = json.loads(base64.b64decode(token, validate=True))
            if [tuple(f) for f in state["filters"]] == filters:
                return int(state["at"])
        except (ValueError, KeyError, TypeError):
            pass
        raise ApiError("InvalidNextTokenException", "The pagination token is invalid.")


def _product(attributes: dict[str, str], usd: float) -> dict[str, Any]:
    """A price-list product as GetProducts returns it: its on-demand price and, with
    another (lower) hourly price, a one-year reserved term."""
    sku = "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16))
    what = f"{attributes['operatingSystem']} {attributes['instanceType']} Instance Hour"

    def term(code: str, price: float, description: str, **term_attributes: str) -> Any:
        rate = f"{sku}.{code}.{HOURLY}"
        dimension = {
            "rateCode": rate, "description": description, "beginRange": "0",
            "endRange": "Inf", "unit": "Hrs", "pricePerUnit": {"USD": f"{price:.10f}"},
            "appliesTo": [],
        }  # fmt: skip
        return {
            f"{sku}.{code}": {
                "priceDimensions": {rate: dimension}, "sku": sku,
                "effectiveDate": "2025-01-01T00:00:00Z", "offerTermCode": code,
                "termAttributes": term_attributes,
            }
        }  # fmt: skip

    return {
        "product": {"productFamily": "Compute Instance", "attributes": attributes, "sku": sku},
        "serviceCode": "AmazonEC2",
        "terms": {
            "OnDemand": term(ON_DEMAND, usd, f"${usd:g} per On Demand {what}"),
            "Reserved": term(RESERVED, usd * 0.6, f"{what}, 1 year, no upfront", **_ONE_YEAR),
        },
        "version": "20250101000000",
        "publicationDate": "2025-01-01T00:00:00Z",
    }


def _check(body: Any) -> None:
    """SerializationException for members the API does not have, InvalidParameterException
    for values it refuses or that this stand-in does not serve (other services or filter
    types)."""
    if not isinstance(body, dict) or set(body) - _MEMBERS:
        raise ApiError("SerializationException", f"Unexpected request: {body!r:.200}")
    filters, size = body.get("Filters", []), body.get("MaxResults", 100)
    if not isinstance(filters, list) or not all(
        isinstance(one, dict) and set(one) == {"Type", "Field", "Value"} for one in filters
    ):
        raise ApiError("SerializationException", f"Filters are Type, Field, Value: {filters!r}")
    if body.get("ServiceCode") != "AmazonEC2":
        _invalid(f"ServiceCode {body.get('ServiceCode')!r} (this stand-in holds AmazonEC2)")
    if body.get("FormatVersion", "aws_v1") != "aws_v1":
        _invalid(f"FormatVersion {body['FormatVersion']!r}")
    if not isinstance(size, int) or not 1 <= size <= 100:
        _invalid(f"MaxResults {size!r}")
    for one in filters:
        if one["Type"] != "TERM_MATCH" or not (one["Field"] and one["Value"]):
            _invalid(f"filter {one!r} (this stand-in takes TERM_MATCH only)")


def _invalid(what: str) -> NoReturn:
    raise ApiError("InvalidParameterException", f"Input Parameters are invalid: {what}")


def _handler(api: PricingApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore's pool uses it
        disable_nagle_algorithm = True  # else each answer waits on a delayed ACK (40 ms)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                self._send(200, self._answer(raw))
            except ApiError as exc:
                self._send(exc.status, exc.document())

        def _answer(self, raw: bytes) -> dict[str, Any]:
            self._authorize()
            if self.path != "/" or self.headers.get("X-Amz-Target") != TARGET:
                raise ApiError("UnknownOperationException", "")
            if self.headers.get("Content-Type", "").split(";")[0] != CONTENT_TYPE:
                raise ApiError("SerializationException", f"Content-Type is {CONTENT_TYPE}")
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                raise ApiError("SerializationException", "The body is not JSON") from None
            with api._lock:
                return api.get_products(body)

        def _authorize(self) -> None:
            """A SigV4 header, scoped to the pricing service in one of its regions, from
            the access key it knows (the signature itself is not checked)."""
            header = self.headers.get("Authorization")
            if not header:
                raise ApiError(
                    "MissingAuthenticationTokenException", "Missing Authentication Token"
                )
            match = _AUTH.fullmatch(header)
            if not match or not self.headers.get("X-Amz-Date"):
                raise ApiError("IncompleteSignatureException", "The request signature is malformed")
            key, region, service = match.groups()
            if service != "pricing" or region not in REGIONS:
                raise ApiError(
                    "InvalidSignatureException",
                    f"Credential should be scoped to a valid region and service 'pricing', "
                    f"not {region!r}/{service!r}.",
                )
            if key != api.access_key:
                raise ApiError(
                    "UnrecognizedClientException",
                    "The security token included in the request is invalid.",
                )

        def _send(self, status: int, document: Any) -> None:
            data = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-amzn-RequestId", secrets.token_hex(16))
            self.end_headers()
            self.wfile.write(data)

    return Handler
