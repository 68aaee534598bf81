#!/usr/bin/env bash
# Idempotent set-up on Debian 12 as root: system packages, then a virtualenv in .venv
# holding lamina and its test dependencies. Sourced by demo.sh and test.sh.
set -euo pipefail
LAMINA_TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export LAMINA_TOP
APT_PACKAGES=(python3 python3-venv python3-dev gcc fuse3 libfuse3-3 libfuse2 busybox-static zstd
              skopeo umoci podman runc fuse-overlayfs unionfs-fuse iproute2 util-linux attr tar
              dpkg-dev meson ninja-build pkg-config liburing-dev libnuma-dev docker-registry apache2-utils
              debootstrap)
need=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
VENV="$LAMINA_TOP/.venv"
stamp="$VENV/.lamina-installed"
want=$( (cat "$LAMINA_TOP/pyproject.toml"; echo editable_mode=compat) | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing lamina into $VENV" >&2
    # compat mode: a .pth naming the checkout, where the default import-hook finder costs every command ~7 ms
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$LAMINA_TOP[test,bench]" \
        --config-settings editable_mode=compat
    echo "$want" > "$stamp"
fi
# Bytecode for lamina's own modules (only what changed is recompiled): with PYTHONDONTWRITEBYTECODE set, as in CI,
# every command would otherwise compile its sources afresh (~25 ms of each `lamina run`).
"$VENV/bin/python" -m compileall -q -j 0 "$LAMINA_TOP/store" "$LAMINA_TOP/unionfs" "$LAMINA_TOP/runtime" \
    "$LAMINA_TOP/bench" >/dev/null
bash "$LAMINA_TOP/scripts/build-libfuse.sh" "$VENV"
# FUSE-over-io-uring is off by default in the kernel (a module parameter, reset at boot). It changes nothing for
# FUSE servers that do not ask for it (fuse-overlayfs on the system's libfuse 3.14 cannot); lamina's daemon asks,
# and falls back to /dev/fuse where it stays off (build-libfuse.sh says what it gains).
uring=/sys/module/fuse/parameters/enable_uring
if [ -w "$uring" ] && [ "$(cat "$uring")" != Y ]; then echo Y > "$uring" 2>/dev/null || true; fi
export PATH="$VENV/bin:$PATH"
# mount(8) runs `mount -t fuse.lamina-fs` helpers with a fixed PATH: put lamina-fs where it looks.
if [ "$(id -u)" = 0 ] && [ -d /usr/local/bin ]; then ln -sfn "$VENV/bin/lamina-fs" /usr/local/bin/lamina-fs; fi
