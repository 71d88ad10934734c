#!/bin/sh
# GPU variant (PVR_GPU=true): the NVIDIA driver from Debian's non-free archive, headless
# (kernel module by DKMS, libcuda, NVML, nvidia-smi, nvidia-persistenced), built for every
# installed kernel. Does nothing otherwise. Needs no GPU on the build machine.
set -eu
export DEBIAN_FRONTEND=noninteractive

if [ "${PVR_GPU:-false}" != true ]; then
    echo "nvidia.sh: PVR_GPU is not true; no NVIDIA driver"
    exit 0
fi

# contrib, non-free and non-free-firmware next to main, in deb822 and one-line sources.
for component in contrib non-free non-free-firmware; do
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$file" ] || continue
        sed -i -E "/^deb(-src)?[[:space:]].*[[:space:]]main([[:space:]]|\$)/{/[[:space:]]${component}([[:space:]]|\$)/! s/\$/ ${component}/}" "$file"
    done
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        sed -i -E "/^Components:.*[[:space:]]main([[:space:]]|\$)/{/[[:space:]]${component}([[:space:]]|\$)/! s/\$/ ${component}/}" "$file"
    done
done
apt-get update -q

# Headers for each installed kernel (and its metapackage, so that a later kernel gets
# its module too): DKMS builds against them, not against the running kernel.
headers=""
for image in $(dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' 'linux-image-*' 2>/dev/null |
    awk '$1 == "ii" { print $2 }'); do
    candidate=$(echo "$image" | sed 's/^linux-image-/linux-headers-/; s/-unsigned$//')
    if apt-cache show "$candidate" >/dev/null 2>&1; then
        headers="$headers $candidate"
    fi
done
if [ -z "$headers" ]; then
    echo "nvidia.sh: no installed linux-image-* package has headers in the archive" >&2
    exit 1
fi

# shellcheck disable=SC2086  # a list of package names
apt-get install -y -q --no-install-recommends $headers \
    nvidia-kernel-dkms nvidia-smi libcuda1 libnvidia-ml1 nvidia-persistenced \
    firmware-nvidia-gsp firmware-misc-nonfree

# Debian names the modules nvidia-current*; "nvidia" and "nvidia-uvm" are its aliases.
printf '%s\n' nvidia nvidia-uvm >/etc/modules-load.d/nvidia.conf
if ! find /lib/modules -name 'nvidia-current.ko*' | grep -q .; then
    echo "nvidia.sh: DKMS built no nvidia module (see /var/lib/dkms/*/build/make.log)" >&2
    exit 1
fi
echo "nvidia.sh: NVIDIA driver installed for:" \
    "$(find /lib/modules -name 'nvidia-current.ko*' | cut -d/ -f4 | sort -u | tr '\n' ' ')"
