#!/bin/sh
# Build (or reuse) a Debian trixie chroot with GIMP 3 for the GIMP host tests.
# usage: .ci/setup-gimp3-root.sh [ROOT]   (default: ${XDG_CACHE_HOME:-$HOME/.cache}/latent-edit/gimp3-root)
# Idempotent: a finished root is reused. Needs root, debootstrap and the Debian mirror.
set -eu
ROOT=${1:-${GIMP3_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/latent-edit/gimp3-root}}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
if [ -x "$ROOT/usr/bin/gimp-console-3.0" ] && [ -f "$ROOT/.latent-edit-ready" ]; then
  echo "gimp3 root ready: $ROOT"; exit 0
fi
command -v debootstrap >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; }
mkdir -p "$(dirname "$ROOT")"
if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
  rm -rf "$ROOT"
  debootstrap --variant=minbase trixie "$ROOT" "$MIRROR"
fi
chroot "$ROOT" apt-get update -qq
chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gimp python3 2>&1 \
  | grep -v -e 'Can not write log' -e '/proc is not mounted' || true
chroot "$ROOT" apt-get clean
chroot "$ROOT" gimp-console-3.0 --version
touch "$ROOT/.latent-edit-ready"
echo "gimp3 root ready: $ROOT"
