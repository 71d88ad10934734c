#!/bin/sh
# Base packages: Python 3 (the runner's interpreter) with venv, CA certificates, curl (the
# GCE user-data step), and podman when PVR_PODMAN=true (flows run in container images).
# Idempotent; works on a builder VM, in a chroot and in a container (no systemd needed).
set -eu
export DEBIAN_FRONTEND=noninteractive

# On a freshly booted builder VM cloud-init may still hold the apt lock.
if [ -d /run/systemd/system ] && command -v cloud-init >/dev/null 2>&1; then
    cloud-init status --wait >/dev/null 2>&1 || true
fi

packages="python3 python3-venv ca-certificates curl"
if [ "${PVR_PODMAN:-false}" = true ]; then
    packages="$packages podman"
fi
apt-get update -q
# shellcheck disable=SC2086  # a list of package names
apt-get install -y -q --no-install-recommends $packages
python3 --version
