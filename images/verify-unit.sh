#!/bin/sh
# `systemd-analyze verify` of prefect-vm-runner.service as an image has it installed.
# The unit names /opt/prefect-vm-runner/venv/bin/python, which this machine lacks, so it
# is verified in a throwaway root (--root): the host's systemd units, the unit and its
# drop-ins under etc/, the real GCE user-data step, and a stub for the venv's python.
# verify exits 0 on warnings (an unknown key, a bad value), so any output fails too.
set -eu
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
unit=prefect-vm-runner.service
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd" \
    "$root/opt/prefect-vm-runner/venv/bin" "$root/usr/local/lib/prefect-vm-runner"
cp -R /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp -R "$here/systemd/$unit" "$here/systemd/$unit.d" "$root/etc/systemd/system/"
cp "$here/files/gce-user-data" "$root/usr/local/lib/prefect-vm-runner/"
printf '#!/bin/sh\n' >"$root/opt/prefect-vm-runner/venv/bin/python"
chmod 0755 "$root/opt/prefect-vm-runner/venv/bin/python"

status=0
output=$(systemd-analyze verify --root="$root" --man=no "$unit" 2>&1) || status=$?
if [ "$status" -ne 0 ] || [ -n "$output" ]; then
    printf '%s\n' "$output" | sed "s|$root||g" >&2
    echo "verify-unit.sh: systemd-analyze verify $unit failed (exit $status)" >&2
    exit 1
fi
echo "verify-unit.sh: $unit (with $unit.d/*.conf) verified"
