"""cgroup limits on real containers (v1 on this host) and the v2 writer against a tree laid out like cgroupfs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime import cgroups
from runtime.cgroups import CgroupV2, Limits

from .conftest import block_device

V1 = cgroups.detect_version() == 1
need_v1 = pytest.mark.skipif(not V1, reason="cgroup v1 host needed for the in-container v1 checks")


@need_v1
def test_memory_limit_oom_kill_is_137_and_oomkilled(lamina, image):
    r = lamina("run", "--name", "hog", "-m", "32m", "--memory-swap", "32m", image, "sh", "-c",
               "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes;"
               " exec dd if=/dev/zero of=/dev/null bs=96M count=1")
    assert r.returncode == 137, r.stderr
    assert r.stdout.split()[:2] == [str(32 << 20), str(32 << 20)]
    ps = lamina("ps", "-a").stdout
    line = next(x for x in ps.splitlines() if x.endswith("hog"))
    assert "Exited (137)" in line and "OOMKilled" in line
    import json
    info = json.loads(lamina("inspect", "hog").stdout)[0]
    assert info["State"]["OOMKilled"] is True and info["State"]["ExitCode"] == 137


@need_v1
def test_memory_swap_defaults_to_twice_memory(lamina, image):
    r = lamina.sh(image, "cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes", "-m", "16m")
    assert r.stdout.strip() == str(32 << 20), r.stderr


@need_v1
def test_pids_limit_stops_a_fork_bomb(lamina, image):
    r = lamina.sh(image, "cat /sys/fs/cgroup/pids/pids.max; for i in $(seq 1 30); do sleep 1 & done; wait",
                  "--pids-limit", "10")
    assert r.stdout.split()[0] == "10"
    assert "Resource temporarily unavailable" in r.stderr


@need_v1
def test_cpu_quota_throttles(lamina, image):
    r = lamina.sh(image, "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us;"
                         " i=0; while [ $i -lt 40000 ]; do i=$((i+1)); done; cat /sys/fs/cgroup/cpu/cpu.stat",
                  "--cpus", "0.05")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["5000", "100000"]
    stat = dict(line.split() for line in lines[2:])
    assert int(stat["nr_throttled"]) > 0


@need_v1
def test_io_limits_written_where_the_kernel_reads_them(lamina, image):
    dev = block_device()
    if dev is None:
        pytest.skip("no block device")
    st = os.stat(dev)
    majmin = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    r = lamina.sh(image, "cat /sys/fs/cgroup/blkio/blkio.throttle.read_bps_device"
                         " /sys/fs/cgroup/blkio/blkio.throttle.write_bps_device",
                  "--device-read-bps", f"{dev}:1mb", "--device-write-bps", f"{dev}:2mb")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{majmin} {1 << 20}", f"{majmin} {2 << 20}"]


def test_container_cgroup_nests_under_callers_and_is_removed(lamina, image):
    r = lamina("run", "-d", image, "sleep", "30")
    assert r.returncode == 0, r.stderr
    c = lamina.containers()[0]
    cg = cgroups.from_json(c.data["cgroup"])
    own = cgroups._own_cgroups()
    if V1:
        for ctrl, d in cg.dirs.items():
            assert str(d.parent).endswith(own[ctrl].rstrip("/")) and d.is_dir()
    assert c.data["pid"] in cg.pids()
    assert lamina("rm", "-f", c.id).returncode == 0
    for p in cg.procs_file():
        assert not p.parent.exists()


# -- v2 writer against a temporary tree laid out like cgroupfs --------------------------------------------------


def _fake_v2(tmp_path: Path) -> CgroupV2:
    parent = tmp_path / "user.slice"
    parent.mkdir()
    (parent / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (parent / "cgroup.subtree_control").write_text("")
    cg = CgroupV2(parent / "lamina-abc")
    cg.create()
    # what the kernel creates in a new cgroup once the controllers are enabled
    for f in ("cgroup.procs", "memory.max", "memory.swap.max", "cpu.max", "pids.max", "io.max", "memory.events",
              "cgroup.freeze"):
        (cg.path / f).write_text("")
    (cg.path / "cgroup.controllers").write_text("cpu io memory pids\n")
    return cg


def test_v2_missing_controller_is_a_clear_error(tmp_path):
    cg = _fake_v2(tmp_path)
    (cg.path / "cgroup.controllers").write_text("cpu pids\n")  # memory not delegated to us
    with pytest.raises(OSError, match="memory controller is not available"):
        cg.apply(Limits(memory=32 << 20))
    cg.apply(Limits(pids=5))
    assert (cg.path / "pids.max").read_text() == "5\n"


def test_v2_enables_controllers_in_parent(tmp_path):
    cg = _fake_v2(tmp_path)
    assert (cg.path.parent / "cgroup.subtree_control").read_text() == "+cpu +memory +pids +io\n"


def test_v2_writes_limits(tmp_path):
    cg = _fake_v2(tmp_path)
    cg.apply(Limits(memory=32 << 20, memory_swap=48 << 20, cpus=1.5, pids=20,
                    read_bps=[("8:0", 1 << 20)], write_bps=[("8:0", 2 << 20), ("8:16", 5)]))
    p = cg.path
    assert (p / "memory.max").read_text() == f"{32 << 20}\n"
    assert (p / "memory.swap.max").read_text() == f"{16 << 20}\n"  # v2 counts swap alone
    assert (p / "cpu.max").read_text() == "150000 100000\n"
    assert (p / "pids.max").read_text() == "20\n"
    assert (p / "io.max").read_text() == f"8:0 rbps={1 << 20} wbps={2 << 20}\n8:16 wbps=5\n"


def test_v2_unlimited_swap_and_pids(tmp_path):
    cg = _fake_v2(tmp_path)
    cg.apply(Limits(memory=64 << 20, memory_swap=-1, pids=0))
    assert (cg.path / "memory.swap.max").read_text() == "max\n"
    assert (cg.path / "pids.max").read_text() == "max\n"


def test_v2_oom_and_membership(tmp_path):
    cg = _fake_v2(tmp_path)
    cg.add(1234)
    assert (cg.path / "cgroup.procs").read_text() == "1234\n"
    assert not cg.oom_killed()
    (cg.path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.oom_killed()
    cg.remove()
    assert not cg.path.exists()


def test_hybrid_host_is_v1():
    with open("/proc/self/mountinfo") as f:
        text = f.read()
    if " - cgroup " in text:
        assert cgroups.detect_version() == 1
    else:
        assert cgroups.detect_version() == 2


def _unified_mount() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, post = line.split(" - ", 1)
            if post.split()[0] == "cgroup2":
                return pre.split()[4]
    return None


def test_v2_placement_and_freeze_on_a_real_cgroup2_tree(tmp_path):
    """Where a cgroup2 tree is mounted (the controller-less "unified" one of a hybrid host, or the whole v2
    hierarchy), the v2 code creates, joins, freezes, thaws and removes for real."""
    import signal
    import subprocess
    if _unified_mount() is None:
        pytest.skip("no cgroup2 mount")
    cg = CgroupV2.for_container(f"lamina-test-{os.getpid()}")
    proc = None
    try:
        cg.create()
        proc = subprocess.Popen(["sleep", "60"])
        cg.add(proc.pid)
        assert cg.pids() == [proc.pid]
        with open(f"/proc/{proc.pid}/cgroup") as f:
            assert any(line.startswith("0::") and line.strip().endswith(cg.path.name) for line in f)
        cg.freeze(True)
        for _ in range(500):
            if "frozen 1" in (cg.path / "cgroup.events").read_text():
                break
        assert "frozen 1" in (cg.path / "cgroup.events").read_text()
        cg.freeze(False)
        for _ in range(500):
            if "frozen 0" in (cg.path / "cgroup.events").read_text():
                break
        assert "frozen 0" in (cg.path / "cgroup.events").read_text()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        cg.remove()
    assert not cg.path.exists()


def test_v2_mode_end_to_end(lamina, image, busybox_dir, tmp_path):
    """LAMINA_CGROUP_VERSION=2 runs containers the v2 way on this hybrid host's controller-less cgroup2 tree:
    placement, cgroup namespace, cgroup2 mount, no CAP_MKNOD and a nodev rootfs (v2 has no devices file)."""
    import subprocess
    if _unified_mount() is None:
        pytest.skip("no cgroup2 mount")
    devimg = tmp_path / "devimg"
    subprocess.run(["cp", "-a", str(busybox_dir), str(devimg)], check=True)
    os.mknod(devimg / "tmp" / "mem", 0o666 | 0o020000, os.makedev(1, 1))  # an image carrying /dev/mem
    lamina.env["LAMINA_CGROUP_VERSION"] = "2"
    try:
        r = lamina("run", "-d", "--name", "v2c", str(devimg), "sh", "-c", "sleep 60")
        assert r.returncode == 0, r.stderr
        c = lamina.containers()[0]
        assert c.data["cgroup"]["version"] == 2
        cg = cgroups.from_json(c.data["cgroup"])
        assert c.data["pid"] in cg.pids()
        r = lamina("exec", "v2c", "sh", "-c", "grep '^0::' /proc/self/cgroup; grep ' /sys/fs/cgroup ' "
                                              "/proc/self/mountinfo | sed 's/.* - //'; grep CapEff /proc/self/status;"
                                              " head -c1 /tmp/mem")
        lines = r.stdout.splitlines()
        assert lines[0] == "0::/"
        assert lines[1].startswith("cgroup2 ")
        assert lines[2].split()[1] == "00000000a00425fb"
        assert "Permission denied" in r.stderr
        assert lamina("commit", "v2c", "v2snap:1").returncode == 0  # freezes through cgroup.freeze
        assert lamina("rm", "-f", "v2c").returncode == 0
        assert not cg.path.exists()
    finally:
        del lamina.env["LAMINA_CGROUP_VERSION"]
