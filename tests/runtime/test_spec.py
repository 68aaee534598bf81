"""Input parsing (no containers): sizes, volumes, limits, users; and resolving paths inside a rootfs."""
from __future__ import annotations

import os

import pytest

from runtime import busybox
from runtime.paths import EscapeError, make_mountpoint, resolve_in_root
from runtime.run import command_line, resolve_user
from runtime.spec import SpecError, parse_env, parse_limits, parse_size, parse_volume


@pytest.mark.parametrize("text, n", [("1024", 1024), ("64m", 64 << 20), ("64MB", 64 << 20), ("1g", 1 << 30),
                                     ("1.5k", 1536), ("512KiB", 512 << 10), ("2 b", 2)])
def test_sizes(text, n):
    assert parse_size(text, "memory") == n


@pytest.mark.parametrize("text", ["", "m", "-1m", "12q", "1..2g"])
def test_bad_sizes(text):
    with pytest.raises(SpecError):
        parse_size(text, "memory")


def test_volume_specs():
    m = parse_volume("/host/dir/:/data:ro")
    assert (m.kind, m.source, m.target, m.readonly) == ("bind", "/host/dir", "/data", True)
    m = parse_volume("cache:/var/cache")
    assert (m.kind, m.source, m.target, m.readonly) == ("volume", "cache", "/var/cache", False)
    m = parse_volume("/anon")
    assert (m.kind, m.target) == ("anon", "/anon")
    assert parse_volume("/h://a/./b/").target == "/a/b"


@pytest.mark.parametrize("spec", ["/h:rel", "/h:/a/../b", "/h:/", "a:b:c:d", "/h:/x:rx", ":/x", "./rel:/x",
                                  "bad name:/x", "/h:"])
def test_bad_volume_specs(spec):
    with pytest.raises(SpecError):
        parse_volume(spec)


def test_limits():
    lim = parse_limits("32m", None, "0.5", 10, (), ())
    assert lim.memory == 32 << 20 and lim.swap_total() == 64 << 20 and lim.cpus == 0.5 and lim.pids == 10
    assert parse_limits("32m", "-1", None, None, (), ()).swap_total() == -1
    for args in (("1m", None, None, None), ("32m", "16m", None, None), (None, "64m", None, None),
                 (None, None, "0", None), (None, None, "x", None), (None, None, None, -5)):
        with pytest.raises(SpecError):
            parse_limits(*args, (), ())
    with pytest.raises(SpecError):
        parse_limits(None, None, None, None, ("/dev/null:1mb",), ())
    with pytest.raises(SpecError):
        parse_limits(None, None, None, None, ("nodevice",), ())


def test_env(monkeypatch):
    monkeypatch.setenv("FROM_HOST", "yes")
    assert parse_env(["A=1", "B=", "FROM_HOST", "UNSET_VAR_XYZ"]) == ["A=1", "B=", "FROM_HOST=yes"]
    with pytest.raises(SpecError):
        parse_env(["=x"])


def test_command_line_follows_docker():
    cfg = {"Entrypoint": ["/entry", "-x"], "Cmd": ["default"]}
    assert command_line(cfg, []) == ["/entry", "-x", "default"]
    assert command_line(cfg, ["mine"]) == ["/entry", "-x", "mine"]
    assert command_line({"Cmd": ["sh"]}, []) == ["sh"]
    assert command_line({}, []) == []


@pytest.fixture(scope="module")
def rootdir(tmp_path_factory):
    d = busybox.build(tmp_path_factory.mktemp("bb") / "r")
    os.symlink("/etc", d / "abs")
    os.symlink("../../..", d / "up")
    os.symlink("bin/../etc", d / "rel")
    os.symlink("loop2", d / "loop1")
    os.symlink("loop1", d / "loop2")
    return str(d)


def test_resolve_in_root(rootdir):
    r = os.path.realpath(rootdir)
    assert resolve_in_root(rootdir, "/abs/passwd") == f"{r}/etc/passwd"
    assert resolve_in_root(rootdir, "/rel/group") == f"{r}/etc/group"
    assert resolve_in_root(rootdir, "/bin/sh") == f"{r}/bin/busybox"
    assert resolve_in_root(rootdir, "/new/dir") == f"{r}/new/dir"
    with pytest.raises(EscapeError):
        resolve_in_root(rootdir, "/up/etc")
    with pytest.raises(EscapeError):
        resolve_in_root(rootdir, "/../etc")
    with pytest.raises(OSError):
        resolve_in_root(rootdir, "/loop1/x")


def test_make_mountpoint(rootdir):
    r = os.path.realpath(rootdir)
    assert make_mountpoint(rootdir, "/abs/sub/dir", True) == f"{r}/etc/sub/dir"
    assert os.path.isdir(f"{r}/etc/sub/dir")
    assert make_mountpoint(rootdir, "/abs/app.conf", False) == f"{r}/etc/app.conf"
    assert os.path.isfile(f"{r}/etc/app.conf")
    with pytest.raises(NotADirectoryError):
        make_mountpoint(rootdir, "/etc/passwd", True)


def test_resolve_user(rootdir):
    assert resolve_user(rootdir, "0") == (0, 0, [0], "/root")
    assert resolve_user(rootdir, "user") == (1000, 1000, [1000], "/home/user")
    assert resolve_user(rootdir, "1000:users")[:2] == (1000, 100)
    assert resolve_user(rootdir, "4242:4243")[:2] == (4242, 4243)  # unknown numeric ids are allowed
    with pytest.raises(SpecError):
        resolve_user(rootdir, "nobody-here")
    with pytest.raises(SpecError):
        resolve_user(rootdir, "user:nogroup-here")


def test_busybox_rootfs(rootdir):
    r = rootdir
    assert os.stat(f"{r}/tmp").st_mode & 0o7777 == 0o1777
    for d in ("proc", "sys", "dev"):
        assert os.path.isdir(f"{r}/{d}")
    assert os.readlink(f"{r}/bin/sh") == "busybox"
    assert os.path.realpath(f"{r}/usr/bin/env") == os.path.realpath(f"{r}/bin/busybox")
    assert "root:x:0:0:" in open(f"{r}/etc/passwd").read()
    with pytest.raises(FileExistsError):
        busybox.build(r)


def test_entrypoint_flag_follows_docker():
    cfg = {"Entrypoint": ["/entry", "-x"], "Cmd": ["default"]}
    assert command_line(cfg, [], "/other") == ["/other"]  # the image's Cmd goes with its entrypoint
    assert command_line(cfg, ["a", "b"], "/other") == ["/other", "a", "b"]
    assert command_line(cfg, ["sh"], "") == ["sh"]


def test_env_file(tmp_path, monkeypatch):
    from runtime.spec import parse_env_file

    monkeypatch.setenv("FROM_HOST", "yes")
    f = tmp_path / "env"
    f.write_text("# comment\n\nA=1\n  B='quoted stays'\nFROM_HOST\nUNSET_XYZ\nC=x=y\n")
    assert parse_env_file(str(f)) == ["A=1", "B='quoted stays'", "FROM_HOST=yes", "C=x=y"]
    for bad in ("=x\n", "A B=1\n"):
        f.write_text(bad)
        with pytest.raises(SpecError):
            parse_env_file(str(f))
    with pytest.raises(SpecError):
        parse_env_file(str(tmp_path / "missing"))


def test_entrypoint_and_env_file(lamina, image, tmp_path):
    """--entrypoint replaces the image's entrypoint and Cmd; --env-file lines apply before -e."""
    env = tmp_path / "env"
    env.write_text("# a comment\nA=from-file\nB=file\n")
    r = lamina("run", "--rm", "--network", "none", "--env-file", str(env), "-e", "B=flag", "--entrypoint", "/bin/sh",
               image, "-c", 'echo "$A $B $0"')
    assert r.returncode == 0, r.stderr
    assert r.stdout == "from-file flag /bin/sh\n"
    r = lamina("run", "--rm", "--env-file", str(tmp_path / "missing"), image, "true")
    assert r.returncode == 125 and r.stderr.count("\n") == 1 and "missing" in r.stderr
    assert lamina.containers() == []


def _cap_set(status: str, field: str) -> set[str]:
    from runtime.linux import ALL_CAPS

    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")), 16)
    return {name for name, bit in ALL_CAPS.items() if mask >> bit & 1}


def test_cap_add_and_drop(lamina, image):
    """Docker's meaning, read from /proc/self/status: names with or without CAP_, any case; ALL; an add wins over
    a drop of the same name; a bad name is one line, exit 125."""
    def caps(*opts: str) -> set[str]:
        r = lamina("run", "--rm", "--network", "none", *opts, image, "cat", "/proc/self/status")
        assert r.returncode == 0, r.stderr
        assert _cap_set(r.stdout, "CapEff") == _cap_set(r.stdout, "CapBnd")
        return _cap_set(r.stdout, "CapEff")

    default = caps()
    assert "CHOWN" in default and "NET_ADMIN" not in default
    assert caps("--cap-drop", "chown", "--cap-add", "CAP_NET_ADMIN") == (default - {"CHOWN"}) | {"NET_ADMIN"}
    assert caps("--cap-drop", "ALL", "--cap-add", "kill") == {"KILL"}
    assert caps("--cap-drop", "ALL") == set()
    every = caps("--cap-add", "ALL", "--cap-drop", "SYS_ADMIN")
    assert "SYS_ADMIN" not in every and {"NET_ADMIN", "SYS_PTRACE", "CHOWN"} <= every
    assert caps("--cap-drop", "KILL", "--cap-add", "KILL") == default
    r = lamina("run", "--rm", "--cap-add", "CAP_NOPE", image, "true")
    assert r.returncode == 125 and r.stderr.count("\n") == 1 and "NOPE" in r.stderr
    assert lamina.containers() == []


def test_tmpfs(lamina, image):
    """--tmpfs as Docker's: nosuid,nodev,noexec and mode 1777 by default, options applied (from mountinfo), the
    size enforced; bad options exit 125 with nothing left."""
    r = lamina("run", "--rm", "--network", "none", "--tmpfs", "/scratch:size=1m,mode=1770", "--tmpfs", "/run/x:exec",
               "--read-only", image, "sh", "-c",
               "grep ' /scratch ' /proc/self/mountinfo; grep ' /run/x ' /proc/self/mountinfo; stat -c %a /scratch;"
               " stat -c %a /run/x; echo hi > /scratch/f && cat /scratch/f;"
               " dd if=/dev/zero of=/scratch/big bs=1k count=2048 2>/dev/null || echo full")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    scratch, runx = lines[0].split(), lines[1].split()
    assert set(scratch[5].split(",")) >= {"rw", "nosuid", "nodev", "noexec"}
    assert "size=1024k" in lines[0] and "tmpfs" in scratch
    assert "noexec" not in runx[5].split(",") and {"nosuid", "nodev"} <= set(runx[5].split(","))
    assert lines[2:] == ["1770", "1777", "hi", "full"]
    for bad in ("relative", "/x:bogus", "/x:size=lots", "/"):
        r = lamina("run", "--rm", "--tmpfs", bad, image, "true")
        assert r.returncode == 125 and r.stderr.count("\n") == 1, (bad, r.stderr)
    assert lamina.containers() == []


def test_tmpfs_under_userns_belongs_to_container_root(lamina, image):
    r = lamina("run", "--rm", "--userns", "--network", "none", "--tmpfs", "/scratch", image, "stat", "-c", "%u:%g",
               "/scratch")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "0:0\n"
