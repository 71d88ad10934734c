#!/bin/sh
# Last step of an image build: leave nothing that belongs to the build machine or to a
# run (package lists, caches, machine-id, cloud-init state, ssh host keys, logs, any
# user-data file), so every VM from the image starts as a first boot. Idempotent.
set -eu
export DEBIAN_FRONTEND=noninteractive

# Never bake a flow run (or its credentials) into an image.
rm -f /etc/prefect-vm-runner/user-data.env
rm -rf /var/lib/prefect-vm-runner/runs /var/lib/prefect-vm-runner/home/.cache

apt-get -y -q autoremove
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
rm -rf /root/.cache /tmp/prefect-vm-runner-image

if command -v cloud-init >/dev/null 2>&1; then
    cloud-init clean --logs --seed
else
    rm -rf /var/lib/cloud/instances /var/lib/cloud/instance /var/lib/cloud/data
fi

# ssh host keys are made again on first boot: by cloud-init (AWS, Azure), by the guest
# agent (GCE), and in any case by this drop-in before sshd starts.
rm -f /etc/ssh/ssh_host_*key /etc/ssh/ssh_host_*key.pub
if [ -f /lib/systemd/system/ssh.service ]; then
    mkdir -p /etc/systemd/system/ssh.service.d
    cat >/etc/systemd/system/ssh.service.d/regenerate-host-keys.conf <<'UNIT'
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
UNIT
fi

# An empty machine-id: systemd makes a new one at first boot (ConditionFirstBoot).
if [ -e /etc/machine-id ]; then
    : >/etc/machine-id
fi
if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then
    rm -f /var/lib/dbus/machine-id
fi
rm -f /var/lib/systemd/random-seed

rm -rf /var/log/journal/*
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' \) -delete
find /var/log -type f -exec truncate -s 0 {} +
rm -f /root/.bash_history
sync
