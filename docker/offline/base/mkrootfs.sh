#!/bin/sh
# Build the root filesystem of the offline base image (Debian bookworm, minbase + python3).
# Usage: mkrootfs.sh ROOTFS_DIR
# The orchestrator hashes this file: any change here gives a new base image tag.
set -eu
rootfs="$1"
debootstrap --variant=minbase --include=python3,python3-venv \
    bookworm "$rootfs" http://deb.debian.org/debian
# No service may start during package installs in image builds.
printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
# Keep images small: no downloaded packages, no package lists, no docs.
printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\n' \
    > "$rootfs/etc/dpkg/dpkg.cfg.d/01-nodoc"
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    > "$rootfs/etc/apt/apt.conf.d/01-norecommends"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
