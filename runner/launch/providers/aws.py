"""The ``aws`` provider: EC2 instances from the runner's AMI, launched to terminate on
poweroff (so the runner's poweroff leaves nothing billed), found again by their tags."""

from __future__ import annotations

import base64
import contextlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from runner.errors import BootstrapError, ConfigError
from runner.launch.providers.base import TAG_POOL, CapacityError, Vm, VmRequest
from runner.launch.user_data import cloud_config

# EC2's answers that mean "not now, not this type or market": try the next candidate.
CAPACITY_ERRORS = {
    "InsufficientInstanceCapacity",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    "InsufficientCapacity",
    "Unsupported",  # this type in this zone, or on the spot market
}
# AWS's answers that mean "asking too often" (EC2's is RequestLimitExceeded; the others are
# botocore's list for the rest of AWS, SSM's ThrottlingException among them). The account's
# request budget is shared by every run of a fleet, so they are not a run's failure, nor a
# reason to try another type: the call is asked again, with backoff, for THROTTLED_SECONDS.
THROTTLING_ERRORS = {
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "EC2ThrottledException",
    "SlowDown",
}
THROTTLED_SECONDS = 300.0
THROTTLED_MAX_WAIT = 20.0  # the longest wait between two tries (botocore's own cap)
# Every other retryable answer (a 5xx, which is how EC2 says InsufficientInstanceCapacity;
# a dropped connection) gets botocore's standard few tries (3 after the first, after short
# jittered waits): a capacity error is answered by trying the next candidate, not by asking
# the same again.
RETRIES = {"max_attempts": 3, "mode": "standard"}
_BAD_INPUT = {
    "InvalidAMIID.NotFound": "the machine image {image} does not exist in {region}",
    "InvalidAMIID.Malformed": "{image} is not an AMI id",
    "InvalidParameterValue": "EC2 refused the request",
    "InvalidInstanceType": "there is no instance type {vm_type} in {region}",
    "InvalidSubnetID.NotFound": "the subnet does not exist",
    "InvalidGroup.NotFound": "a security group does not exist",
}
_CREDENTIALS = "an instance role, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile"
# AWS's answers that mean the credentials themselves were refused (EC2 says AuthFailure,
# the JSON APIs such as the price list's UnrecognizedClientException, a wrong secret key
# SignatureDoesNotMatch, an old session token ExpiredToken) ...
_REFUSED = {
    "AuthFailure",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "InvalidSignatureException",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",
}
# ... and those that mean they may not make this call.
_DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"}
# Where api_key_in_ssm keeps each VM's API key: SSM_PREFIX/<VM name>, deleted with the VM.
SSM_PREFIX = "/prefect-vm-runner"
_STATES = {
    "pending": "starting",
    "running": "running",
    "stopping": "stopped",
    "stopped": "stopped",
    "shutting-down": "gone",
    "terminated": "gone",
}


class AwsProvider:
    """EC2 in one region, through boto3 (credentials from its usual chain: the worker's
    instance role, environment, profile; ``AWS_ENDPOINT_URL`` points it elsewhere)."""

    def __init__(
        self,
        *,
        region: str | None = None,
        subnet: str | None = None,
        security_groups: Sequence[str] | None = None,
        identity: str | None = None,
        api_key_in_ssm: bool = False,
        ec2: Any | None = None,
        **_: object,
    ) -> None:
        if ec2 is None:
            ec2 = client("ec2", region)
        self._ec2 = ec2
        self._region = ec2.meta.region_name
        self._subnet = subnet
        self._security_groups = list(security_groups or [])
        self._identity = identity
        self._api_key_in_ssm = api_key_in_ssm
        self._ssm_client: Any | None = None
        self._known_types: set[str] = set()

    def create(self, request: VmRequest) -> Vm:
        if not request.machine_image:
            raise ConfigError("the aws provider needs machine_image: the runner's AMI id")
        if not request.vm_type:
            raise ConfigError("the aws provider needs an instance type (vm_types)")
        root_device = self._root_device(request.machine_image)  # and: the AMI exists here
        self._check_type(request.vm_type)
        tags = [{"Key": key, "Value": value} for key, value in request.tags.items()]
        tags.append({"Key": "Name", "Value": request.name})
        user_data = self._key_to_ssm(request) if self._api_key_in_ssm else request.user_data
        params: dict[str, Any] = {
            "ImageId": request.machine_image,
            "InstanceType": request.vm_type,
            "MinCount": 1,
            "MaxCount": 1,
            "UserData": cloud_config(user_data),
            # The runner powers the VM off at the end: that terminates it, disks and all.
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            # Idempotency: a retry of this call (throttled, or its answer lost) that EC2 had
            # already carried out returns that instance rather than starting a second one.
            # New for each call: a later launch of the same run is another instance.
            "ClientToken": str(uuid.uuid4()),
        }
        if request.spot:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        if self._subnet:
            params["SubnetId"] = self._subnet
        if self._security_groups:
            params["SecurityGroupIds"] = self._security_groups
        if self._identity:
            key = "Arn" if self._identity.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {key: self._identity}
        if request.disk_size_gb:
            params["BlockDeviceMappings"] = [
                {
                    "DeviceName": root_device,
                    "Ebs": {"VolumeSize": request.disk_size_gb, "DeleteOnTermination": True},
                }
            ]
        try:
            with self._errors(f"starting {request.vm_type}", image=request.machine_image):
                instance = self._ec2.run_instances(**params)["Instances"][0]
        except BaseException:
            self._forget_key(request.name)
            raise
        return _vm(instance)

    def describe(self, vm_id: str) -> Vm:
        try:
            with self._errors(f"describing {vm_id}"):
                reservations = self._ec2.describe_instances(InstanceIds=[vm_id])["Reservations"]
        except ConfigError as exc:
            if "InvalidInstanceID" in str(exc):
                return Vm(vm_id, "gone")
            raise
        instances = [i for r in reservations for i in r["Instances"]]
        return _vm(instances[0]) if instances else Vm(vm_id, "gone")

    def delete(self, vm_id: str) -> None:
        name = self.describe(vm_id).tags.get("Name") if self._api_key_in_ssm else None
        try:
            with self._errors(f"terminating {vm_id}"):
                self._ec2.terminate_instances(InstanceIds=[vm_id])
        except ConfigError as exc:
            if "InvalidInstanceID" not in str(exc):  # gone already: nothing to delete
                raise
        if name:
            self._forget_key(name)

    def console(self, vm_id: str) -> str:
        try:
            with self._errors(f"reading the console of {vm_id}"):
                output = self._ec2.get_console_output(InstanceId=vm_id, Latest=True)
        except RuntimeError:
            return ""
        return _text(output.get("Output") or "")

    def list(self, pool: str) -> list[Vm]:
        filters = [
            {"Name": f"tag:{TAG_POOL}", "Values": [pool]},
            {
                "Name": "instance-state-name",
                "Values": ["pending", "running", "stopping", "stopped"],
            },
        ]
        vms = []
        with self._errors(f"listing the VMs of pool {pool}"):
            for page in self._ec2.get_paginator("describe_instances").paginate(Filters=filters):
                vms.extend(_vm(i) for r in page["Reservations"] for i in r["Instances"])
        return vms

    def _key_to_ssm(self, request: VmRequest) -> dict[str, str]:
        """The user-data with the API key swapped for the name of an SSM SecureString
        parameter that holds it; the runner reads it at start with the VM's role."""
        data = dict(request.user_data)
        key = data.pop("PREFECT_API_KEY", None)
        if key is None:
            return data
        name = f"{SSM_PREFIX}/{request.name}"
        with self._errors(f"storing the API key in SSM parameter {name}"):
            self._ssm().put_parameter(Name=name, Value=key, Type="SecureString", Overwrite=True)
        data["RUNNER_PREFECT_API_KEY_SSM"] = name
        data.setdefault("AWS_DEFAULT_REGION", self._region)  # where the runner finds it
        return data

    def _forget_key(self, vm_name: str) -> None:
        if not self._api_key_in_ssm:
            return
        from botocore.exceptions import ClientError

        with contextlib.suppress(ClientError):  # never stored, or deleted already
            self._ssm().delete_parameter(Name=f"{SSM_PREFIX}/{vm_name}")

    def _ssm(self) -> Any:
        if self._ssm_client is None:
            self._ssm_client = client("ssm", self._region)
        return self._ssm_client

    def _root_device(self, image_id: str) -> str:
        """The AMI's root device name; ConfigError when the AMI is not in this region."""
        with self._errors("reading the machine image", image=image_id):
            images = self._ec2.describe_images(ImageIds=[image_id])["Images"]
        if not images:
            raise ConfigError(f"the machine image {image_id} does not exist in {self._region}")
        return images[0].get("RootDeviceName") or "/dev/xvda"

    def _check_type(self, vm_type: str) -> None:
        """ConfigError for a type this region does not have (once per type): a typo in
        vm_types is not a capacity problem to fall back from."""
        if vm_type in self._known_types:
            return
        with self._errors(f"checking instance type {vm_type}", vm_type=vm_type):
            self._ec2.describe_instance_types(InstanceTypes=[vm_type])
        self._known_types.add(vm_type)

    @contextmanager
    def _errors(self, doing: str, *, image: str = "", vm_type: str = "") -> Iterator[None]:
        """botocore's errors as the runner's: capacity, bad input, or aws_errors' rest."""
        from botocore.exceptions import ClientError

        with aws_errors(doing):
            try:
                yield
            except ClientError as exc:
                error = exc.response.get("Error", {})
                code, message = error.get("Code", ""), error.get("Message", "")
                if code in CAPACITY_ERRORS:
                    raise CapacityError(f"{code}: {message}") from None
                if code in _BAD_INPUT or code.startswith("InvalidInstanceID"):
                    why = _BAD_INPUT.get(code, "no such instance").format(
                        image=image, vm_type=vm_type, region=self._region
                    )
                    raise ConfigError(f"{doing}: {why} ({code}: {message})") from None
                raise


def client(service: str, region: str | None) -> Any:
    """A boto3 client for the provider: botocore's standard retries (RETRIES) for what
    fails now and then, patience with throttling (``patient_with_throttling``)."""
    try:
        import boto3
    except ImportError:
        raise ConfigError(
            "the aws provider needs boto3: pip install 'prefect-vm-runner[launch-aws]'"
        ) from None
    from botocore.config import Config

    # The worker makes clients from several threads at once (a provider per run, its SSM
    # client in the run's thread). boto3's default session is not safe for that, and a
    # session per client would load the service's model each time (0.2 s, not 0.02).
    with _CLIENTS:
        made = boto3.client(service, region_name=region, config=Config(retries=dict(RETRIES)))
    patient_with_throttling(made)
    return made


_CLIENTS = threading.Lock()


def patient_with_throttling(
    boto_client: Any,
    *,
    seconds: float = THROTTLED_SECONDS,
    jitter: Callable[[float, float], float] = random.uniform,
) -> None:
    """Make ``boto_client`` ask again when AWS throttles it (THROTTLING_ERRORS), for up to
    ``seconds`` per call, after a wait drawn (``jitter``) from 0 to 2**tries s, at most
    THROTTLED_MAX_WAIT: the jitter spreads a fleet's calls out, where waits in step would
    be throttled again. Any other answer is left to the client's retry mode.

    Why not botocore's settings alone: their ``max_attempts`` is one number for every
    retryable answer, and EC2 says "no capacity" with a 500, which standard retries too;
    enough attempts to outlast throttling would try a type with no capacity for a minute
    before the next one. Nor the ``adaptive`` mode: its rate limiter is the client's own,
    and the worker makes a client per run, while the budget is the account's."""
    service = boto_client.meta.service_model.service_id.hyphenize()

    def needs_retry(
        response: Any, attempts: int, request_dict: dict[str, Any], **_: Any
    ) -> float | None:
        if response is None:  # no answer at all: the retry mode's business
            return None
        code = (response[1].get("Error") or {}).get("Code")
        if code not in THROTTLING_ERRORS:
            return None
        context = request_dict["context"]  # the same for every try of one call
        since = context.setdefault("runner_throttled_since", time.monotonic())
        left = since + seconds - time.monotonic()
        if left <= 0:
            return None  # left to the retry mode, whose few tries are spent
        return min(jitter(0, min(2.0 ** (attempts - 1), THROTTLED_MAX_WAIT)), left)

    # First of the needs-retry handlers: botocore retries after the first that answers.
    boto_client.meta.events.register_first(
        f"needs-retry.{service}", needs_retry, unique_id=f"runner-throttling-{service}"
    )


@contextmanager
def aws_errors(call: str, region: str | None = None) -> Iterator[None]:
    """botocore's errors as the runner's, one line each, never the secret: what the user
    must fix is a ConfigError, AWS failing or not answering is a BootstrapError.
    ``region``: the one the call goes to, where the user chose it."""
    where = f" in {region}" if region else ""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        CredentialRetrievalError,
        InvalidRegionError,
        NoCredentialsError,
        PartialCredentialsError,
    )
    from botocore.parsers import ResponseParserError

    try:
        yield
    except NoCredentialsError:
        raise ConfigError(f"{call}: no AWS credentials ({_CREDENTIALS})") from None
    except (PartialCredentialsError, CredentialRetrievalError) as exc:
        raise ConfigError(f"{call}: {exc} ({_CREDENTIALS})") from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        # the first line only: a signature mismatch goes on with the canonical request
        message = (error.get("Message") or "").splitlines()
        said = f"{code}: {message[0] if message else ''}"
        if code in _REFUSED:
            raise ConfigError(
                f"{call}: AWS refused the credentials ({said}); check them ({_CREDENTIALS})"
            ) from None
        if code in _DENIED:
            raise ConfigError(
                f"{call}: the credentials may not call it; allow {call} in their IAM policy "
                f"({said})"
            ) from None
        if code == "OptInRequired" and region:
            raise ConfigError(f"{call}: the account has not enabled {region} ({said})") from None
        raise BootstrapError(f"{call}{where}: AWS failed: {said}") from None
    except ConnectionError as exc:  # unreachable, refused, timed out
        also = f", and that {region} is an AWS region" if region else ""
        raise BootstrapError(
            f"{call}: {exc}; check the network, any proxy or AWS_ENDPOINT_URL* setting{also}"
        ) from None
    except ResponseParserError as exc:  # no BotoCoreError: an answer that is not AWS's
        raise ConfigError(
            f"{call}: an answer that is not AWS's ({str(exc).splitlines()[0]}); check any "
            "proxy or AWS_ENDPOINT_URL* setting"
        ) from None
    except InvalidRegionError as exc:
        raise ConfigError(f"{exc.kwargs['region_name']!r} is not an AWS region name") from None
    except BotoCoreError as exc:
        raise BootstrapError(f"{call}{where}: {exc}") from None


def _vm(instance: dict[str, Any]) -> Vm:
    tags = {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
    return Vm(
        instance["InstanceId"],
        _STATES.get(instance["State"]["Name"], "running"),  # type: ignore[arg-type]
        tags=tags,
        created=instance.get("LaunchTime"),
        vm_type=instance.get("InstanceType", ""),
        spot=instance.get("InstanceLifecycle") == "spot",
    )


def _text(output: str) -> str:
    """EC2 console output: base64 text where the SDK did not decode it."""
    try:
        return base64.b64decode(output, validate=True).decode(errors="replace")
    except ValueError:
        return output


def from_config(**config: Any) -> AwsProvider:
    return AwsProvider(**config)
