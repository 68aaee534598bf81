#!/usr/bin/env bash
# The main job: set up, import a busybox image (and a variant sharing its files) into the store, then show the
# image's history and what deduplication saved. Later steps mount the image and run a container in it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
work=$(mktemp -d /tmp/lamina-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

python -m runtime.busybox "$work/busybox" >/dev/null
cp -a "$work/busybox" "$work/variant"
echo "hello from a second image" > "$work/variant/etc/motd"

step lamina import "$work/busybox" -t busybox:latest -c 'CMD ["/bin/sh"]'
step lamina import "$work/variant" -t busybox:variant -c 'CMD ["/bin/sh"]'
step lamina images
step lamina history busybox
step lamina df
step lamina fsck --quick
