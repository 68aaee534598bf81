#!/usr/bin/env bash
# The main job: set up, import a busybox image (and a variant sharing its files) into the store, mount it with
# lamina's union filesystem, run a container in it, and show the image's history and what deduplication saved.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
work=$(mktemp -d /tmp/lamina-demo.XXXXXX)
cleanup() {
    lamina umount "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

python -m runtime.busybox "$work/busybox" >/dev/null
cp -a "$work/busybox" "$work/variant"
echo "hello from a second image" > "$work/variant/etc/motd"
# Fixed times make the images reproducible: a second run of the demo finds them already stored.
find "$work/busybox" "$work/variant" -exec touch -h -d 2024-01-01T00:00:00Z {} +

step lamina import "$work/busybox" -t busybox:latest -c 'CMD ["/bin/sh"]'
step lamina import "$work/variant" -t busybox:variant -c 'CMD ["/bin/sh"]'
step lamina images
mkdir -p "$work/mnt" "$work/upper" "$work/work"
step lamina mount busybox "$work/mnt" --upper "$work/upper" --work "$work/work"
step sh -c "echo changed > '$work/mnt/etc/motd' && rm '$work/mnt/etc/group' && ls -l '$work/mnt/etc'"
step ls -la "$work/upper/etc"     # kernel overlayfs's upper format: a 0/0 char device is the whiteout
step lamina umount "$work/mnt"
step lamina run --rm --network none --hostname demo busybox \
    sh -c 'echo "hello from $(hostname), pid $$"; ip -o link | cut -d" " -f2; ps'
step lamina history busybox
step lamina df
step lamina fsck --quick
