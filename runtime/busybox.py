"""Builds a minimal busybox root filesystem directory, the test and demo image of lamina.

`python -m runtime.busybox DEST` copies Debian's statically linked busybox (package busybox-static) to
DEST/bin/busybox, links every applet from `busybox --list-full` to it, and adds the few files a container expects:
/etc/passwd, /etc/group, a 1777 /tmp and empty /proc, /sys and /dev mount points.
The result is deterministic (fixed modes, no timestamps kept) so that importing it twice gives the same layer.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BUSYBOX = "/bin/busybox"

PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
user:x:1000:1000:user:/home/user:/bin/sh
"""
GROUP = """root:x:0:
daemon:x:1:
bin:x:2:
tty:x:5:
users:x:100:
user:x:1000:
nogroup:x:65534:
"""


def _is_static(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    # A dynamically linked ELF names its interpreter in a PT_INTERP segment.
    return head[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in head and b"/lib/ld-" not in head


def build(dest: str | os.PathLike[str], busybox: str = BUSYBOX) -> Path:
    """Create the rootfs at `dest` (which must not exist or be empty) and return its path."""
    root = Path(dest)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: exists and is not empty")
    if not os.path.exists(busybox):
        raise FileNotFoundError(f"{busybox}: not found (install busybox-static)")
    if not _is_static(busybox):
        raise ValueError(f"{busybox}: not a static binary (install busybox-static)")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home/user", "proc", "sys", "dev", "var",
              "run", "mnt"):
        (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / d, 0o755)
    os.chmod(root / "root", 0o700)
    os.chown(root / "home/user", 1000, 1000)
    (root / "tmp").mkdir(exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copyfile(busybox, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    applets = subprocess.run([busybox, "--list-full"], check=True, capture_output=True, text=True).stdout.split()
    for rel in applets:
        link = root / rel
        if link.name == "busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(root / "bin/busybox", link.parent), link)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    for f in ("etc/passwd", "etc/group"):
        os.chmod(root / f, 0o644)
    return root


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m runtime.busybox DEST", file=sys.stderr)
        return 2
    try:
        out = build(args[0])
    except (OSError, ValueError, subprocess.CalledProcessError) as e:
        print(f"busybox: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
