#!/bin/sh
# The runner in its own venv (/opt/prefect-vm-runner/venv, with uv), its systemd unit
# (enabled), the GCE user-data step, and optionally prebuilt flow environments.
#
# Environment (the Packer templates set it from their variables):
#   PVR_RUNNER_WHEEL    a wheel file on this machine; wins over PVR_RUNNER_VERSION
#   PVR_RUNNER_VERSION  version from the package index; empty: the newest
#   PVR_RUNNER_EXTRAS   extras, comma-separated (s3, gcs, azure)
#   PVR_INDEX_URL       package index for every install here; empty: PyPI
#   PVR_PREBUILD_SPECS  env specs (URLs as `env push` prints them, or paths here),
#                       space-separated, built into the workdir's env cache
#   PVR_FILES           the images/ directory (systemd/, files/); default: ../ of this
#                       script (Packer uploads it to /tmp/prefect-vm-runner-image)
# Idempotent; works in a chroot or container too (the unit is enabled offline).
set -eu
export DEBIAN_FRONTEND=noninteractive UV_PYTHON_DOWNLOADS=never

files=${PVR_FILES:-$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)}
wheel=${PVR_RUNNER_WHEEL:-}
version=${PVR_RUNNER_VERSION:-}
extras=${PVR_RUNNER_EXTRAS:-}
venv=/opt/prefect-vm-runner/venv
workdir=/var/lib/prefect-vm-runner
confdir=/etc/prefect-vm-runner
unit=prefect-vm-runner.service

if [ -n "${PVR_INDEX_URL:-}" ]; then
    export UV_INDEX_URL="$PVR_INDEX_URL" PIP_INDEX_URL="$PVR_INDEX_URL"
    export RUNNER_INDEX_URL="$PVR_INDEX_URL"
fi

# The venv, and uv in it (the runner depends on uv too, and materializes envs with it).
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ ! -x "$venv/bin/uv" ]; then
    "$venv/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check uv
fi

name="prefect-vm-runner${extras:+[$extras]}"
if [ -n "$wheel" ]; then
    [ -f "$wheel" ] || { echo "runner.sh: no wheel at $wheel" >&2; exit 1; }
    requirement="$name @ file://$(realpath "$wheel")"
elif [ -n "$version" ] && [ "$version" != latest ]; then
    requirement="$name==$version"
else
    requirement="$name"
fi
echo "runner.sh: installing $requirement into $venv"
# Bytecode compiled now saves every boot ~1.7 s (README: Benchmarks).
"$venv/bin/uv" pip install --quiet --no-cache --compile-bytecode \
    --python "$venv/bin/python" --reinstall-package prefect-vm-runner "$requirement"
"$venv/bin/python" -m runner --help >/dev/null
ln -sf "$venv/bin/uv" /usr/local/bin/uv
ln -sf "$venv/bin/prefect-vm-runner" /usr/local/bin/prefect-vm-runner

# Directories (the unit also creates them), the unit and the GCE user-data step.
install -d -m 0700 "$workdir" "$workdir/home" "$confdir"
install -D -m 0755 "$files/files/gce-user-data" /usr/local/lib/prefect-vm-runner/gce-user-data
install -D -m 0644 "$files/systemd/$unit" "/etc/systemd/system/$unit"
if command -v podman >/dev/null 2>&1; then
    install -D -m 0644 "$files/systemd/$unit.d/podman.conf" "/etc/systemd/system/$unit.d/podman.conf"
fi
# `systemctl enable` works offline (chroot, container, image build); the symlink is what
# it makes, for an image whose systemctl cannot run here.
if ! systemctl enable "$unit" 2>/dev/null; then
    mkdir -p /etc/systemd/system/multi-user.target.wants
    ln -sf "/etc/systemd/system/$unit" "/etc/systemd/system/multi-user.target.wants/$unit"
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

# Prebuilt environments: a run whose env is here starts without installing anything.
# Same interpreter and workdir as the unit, so the cache keys match.
set -f
for spec in ${PVR_PREBUILD_SPECS:-}; do
    echo "runner.sh: building env $spec"
    HOME="$workdir/home" RUNNER_WORKDIR="$workdir" "$venv/bin/python" -m runner env build "$spec"
done
set +f
echo "runner.sh: done ($("$venv/bin/python" -c 'import importlib.metadata as m; print("prefect-vm-runner", m.version("prefect-vm-runner"))'))"
