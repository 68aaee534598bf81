#!/usr/bin/env bash
# Builds libfuse 3.17 into $1 (the virtualenv) as lib/lamina/libfuse3.so.4, once. Sourced from setup.sh.
#
# Why: Debian 12 ships libfuse 3.14, which predates FUSE passthrough (libfuse 3.16, kernel 6.9): with it, reads
# and writes of an open file go straight from the kernel to the backing file and never reach the Python daemon.
# trixie's binary package needs glibc 2.38, so its *source* package is built here against the host's glibc.
# apt fetches and verifies the source through a private configuration; the host's apt sources are not touched.
# Any failure leaves lamina on the system's libfuse 3.14 (no passthrough) with a warning, not a broken set-up.
set -uo pipefail
VENV_DIR=$1
dest="$VENV_DIR/lib/lamina"
[ -f "$dest/libfuse3.so.4" ] && [ -f "$dest/libfuse.version" ] && exit 0
work=$(mktemp -d /var/tmp/lamina-libfuse.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
cat > "$work/sources.list" <<SRC
deb-src http://deb.debian.org/debian trixie main
SRC
apt_opts=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o APT::Sandbox::User=root)
echo "setup: building libfuse 3.17 from trixie's source (FUSE passthrough) into $dest" >&2
if ! ( cd "$work" && apt-get "${apt_opts[@]}" -qq update >/dev/null &&
       apt-get "${apt_opts[@]}" -qq source --download-only fuse3/trixie >/dev/null 2>&1 &&
       tar xzf fuse3_*.orig.tar.gz && src=$(echo fuse-3.*) && [ -d "$src" ] && echo "${src#fuse-}" >version &&
       meson setup build "$src" -Dutils=false -Dexamples=false -Dtests=false \
             -Dbuildtype=release --prefix=/usr >build.log 2>&1 &&
       ninja -C build >>build.log 2>&1 ); then
    echo "setup: WARNING: could not build libfuse 3.17; lamina uses the system's libfuse 3.14" \
         "(no FUSE passthrough). Log: $(tail -n 3 "$work/build.log" 2>/dev/null | tr '\n' ' ')" >&2
    exit 0
fi
mkdir -p "$dest"
cp -L "$work/build/lib/libfuse3.so.4" "$dest/libfuse3.so.4.tmp"
mv "$dest/libfuse3.so.4.tmp" "$dest/libfuse3.so.4"
cp "$work/version" "$dest/libfuse.version"
