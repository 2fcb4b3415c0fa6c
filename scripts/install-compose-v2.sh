#!/usr/bin/env bash
# Install Docker Compose v2 (and buildx, with which it builds) as Docker CLI plugins, on Debian
# 12 as root, for the tests that run compose v2 beside docker-compose 1.29.
#
# Bookworm has neither; Debian trixie's packages are static Go binaries that run here. They
# are downloaded from a temporary, separate sources entry, which is removed again at once (the
# machine stays on bookworm: nothing from trixie is installed system-wide), and unpacked into
# ~/.docker/cli-plugins. Safe to run again: it does nothing when `docker compose` answers.
set -euo pipefail
plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
if docker compose version >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "error: compose v2 is missing; as root, run $0" >&2
  exit 1
fi
sources=/etc/apt/sources.list.d/cachestack-trixie-download.sources
work=$(mktemp -d)
cleanup() { rm -f "$sources"; apt-get update -qq || true; rm -rf "$work"; }
trap cleanup EXIT
uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
cat > "$sources" <<SOURCES
Types: deb
URIs: ${uri:-http://deb.debian.org/debian}
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
echo "downloading docker-compose and docker-buildx from Debian trixie"
apt-get update -qq
(cd "$work" && apt-get download -qq docker-compose/trixie docker-buildx/trixie 2>/dev/null)
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/unpacked"; done
install -d "$plugins"
install -m 0755 "$work"/unpacked/usr/libexec/docker/cli-plugins/docker-{compose,buildx} "$plugins/"
docker compose version
