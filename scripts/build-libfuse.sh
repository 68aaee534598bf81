#!/usr/bin/env bash
# Builds libfuse 3.18 (else 3.17) into $1 (the virtualenv) as lib/lamina/libfuse3.so.4, once. Run by setup.sh.
#
# Why: Debian 12 ships libfuse 3.14, which predates FUSE passthrough (libfuse 3.16, kernel 6.9): with it, reads
# and writes of an open file go straight from the kernel to the backing file and never reach the Python daemon.
# libfuse 3.18 adds FUSE-over-io-uring (kernel 6.14, `fuse.enable_uring`): one request ring per CPU, served by a
# thread on that CPU, so a request and its reply cost no cross-CPU wake-up. On this class of 2-CPU VM that halves
# the cost of a lookup (stat of 5,000 files on a fresh mount: 210 -> 115 ms).
# Newer Debian suites' binary packages need a newer glibc, so the *source* package is built here against the host's.
# forky (testing) has 3.18; trixie's 3.17 is the fallback (passthrough, no io_uring). apt fetches and verifies the
# source through a private configuration; the host's apt sources are not touched. Any failure leaves lamina on the
# system's libfuse 3.14 (no passthrough) with a warning, not a broken set-up.
# One patch (libfuse-setattr-nothing.patch): the high-level API answers a SETATTR that sets nothing, which is what
# chown(path, -1, -1) sends, with the attributes alone; it goes to the file system's chown instead, so that ctime
# changes (and a union copies up) as on any other file system.
set -uo pipefail
VENV_DIR=$1
dest="$VENV_DIR/lib/lamina"
RECIPE="3 forky,trixie io_uring setattr-nothing"  # change to rebuild existing virtualenvs
PATCH=$(cd "$(dirname "$0")" && pwd)/libfuse-setattr-nothing.patch
[ -f "$dest/libfuse3.so.4" ] && [ "$(cat "$dest/libfuse.recipe" 2>/dev/null)" = "$RECIPE" ] && exit 0
work=$(mktemp -d /var/tmp/lamina-libfuse.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
cat > "$work/sources.list" <<SRC
deb-src http://deb.debian.org/debian forky main
deb-src http://deb.debian.org/debian trixie main
SRC
apt_opts=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o APT::Sandbox::User=root)
build() {  # $1: suite
    rm -rf "$work/src" && mkdir "$work/src" && cd "$work/src" &&
    apt-get "${apt_opts[@]}" -qq source --download-only "fuse3/$1" >/dev/null 2>&1 &&
    tar xzf fuse3_*.orig.tar.gz && src=$(echo fuse-3.*) && [ -d "$src" ] && echo "${src#fuse-}" >version &&
    { patch -d "$src" -p1 --forward --quiet <"$PATCH" >build.log 2>&1 ||
      echo "setup: WARNING: $(basename "$PATCH") does not apply to $src, built without it" >&2; } &&
    meson setup build "$src" -Dutils=false -Dexamples=false -Dtests=false \
          -Dbuildtype=release --prefix=/usr >>build.log 2>&1 &&
    ninja -C build >>build.log 2>&1
}
echo "setup: building libfuse from Debian's source (FUSE passthrough, io_uring) into $dest" >&2
# (its status is not checked: one suite's index may fail, expired say, and the other still serve)
apt-get "${apt_opts[@]}" -qq update >/dev/null 2>&1
built=
for suite in forky trixie; do
    if build "$suite"; then built=$suite; break; fi
    echo "setup: libfuse from $suite: not fetched or not built $(tail -n 2 "$work/src/build.log" 2>/dev/null | tr '\n' ' ')" >&2
done
if [ -z "$built" ]; then
    echo "setup: WARNING: could not build libfuse; lamina uses the system's libfuse 3.14 (no FUSE passthrough)" >&2
    exit 0
fi
cd "$work/src"
mkdir -p "$dest"
cp -L build/lib/libfuse3.so.4 "$dest/libfuse3.so.4.tmp"
mv "$dest/libfuse3.so.4.tmp" "$dest/libfuse3.so.4"
uring=$(grep -q '^#define HAVE_URING' build/fuse_config.h && echo "io_uring" || echo "no io_uring")
echo "setup: libfuse $(cat version) from $built ($uring)" >&2
cp version "$dest/libfuse.version"
echo "$RECIPE" > "$dest/libfuse.recipe"
