"""Exit codes, signals, the init's reaping, and ps/logs/stop/kill/rm/exec/diff on real containers."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from runtime import state

from .conftest import cgroup_dirs, mounts_under


def test_exit_codes(lamina, image):
    assert lamina.sh(image, "exit 3").returncode == 3
    assert lamina("run", "--rm", image, "true").returncode == 0
    r = lamina("run", "--rm", image, "no-such-command")
    assert r.returncode == 127 and "executable file not found" in r.stderr
    r = lamina("run", "--rm", image, "/etc/passwd")
    assert r.returncode == 126 and "permission denied" in r.stderr
    # killed by a signal: 128+N
    assert lamina.sh(image, "kill -TERM $$; sleep 5").returncode == 128 + signal.SIGTERM
    assert lamina.sh(image, "kill -KILL $$").returncode == 137


def test_signal_to_lamina_run_reaches_the_command(lamina, image):
    p = lamina.popen("run", "--rm", image, "sh", "-c",
                     "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 0.1; done")
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
        assert "got-term" in out
        assert p.returncode == 7
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_ctrl_c_reaches_the_command_once(lamina, image):
    # the terminal sends SIGINT to the whole foreground process group: lamina forwards it, the container must not
    # get a second copy, and the union filesystem daemon (its own session) must not get it at all
    p = lamina.popen("run", "--rm", image, "sh", "-c",
                     "n=0; trap 'n=$((n+1))' INT; echo ready; while [ $n -eq 0 ]; do sleep 0.1; done; sleep 0.5;"
                     " echo ints=$n; ls /bin >/dev/null && echo rootfs-ok", start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert "ints=1" in out and "rootfs-ok" in out
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_init_reaps_orphaned_zombies(lamina, image):
    script = ("sh -c 'sleep 0.2 & echo $! > /tmp/orphan'; pid=$(cat /tmp/orphan); n=0;"
              " while [ -e /proc/$pid ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done;"
              " if [ -e /proc/$pid ]; then grep State /proc/$pid/status; else echo reaped; fi")
    r = lamina.sh(image, script)
    assert r.stdout.strip() == "reaped", r.stdout + r.stderr


def test_detached_ps_logs_exec_stop(lamina, image):
    r = lamina("run", "-d", "--name", "svc", image, "sh", "-c",
               "echo hello-log; trap 'echo bye; exit 5' TERM; while true; do sleep 0.1; done")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    assert len(cid) == 64
    ps = lamina("ps").stdout.splitlines()
    assert ps[0].split()[:2] == ["CONTAINER", "ID"]
    assert any(line.startswith(cid[:12]) and "Up " in line and line.endswith("svc") for line in ps)
    r = lamina("exec", "svc", "sh", "-c", "hostname; for n in pid mnt uts ipc net cgroup; do readlink /proc/self/ns/$n;"
                                          " done; exit 4")
    assert r.returncode == 4, r.stderr
    init = lamina.containers()[0].data["pid"]
    host_name, *nss = r.stdout.split()
    assert host_name == cid[:12]
    assert nss == [os.readlink(f"/proc/{init}/ns/{n}") for n in ("pid", "mnt", "uts", "ipc", "net", "cgroup")]
    for _ in range(100):
        if "hello-log" in lamina("logs", "svc").stdout:
            break
    assert "hello-log" in lamina("logs", "svc").stdout
    assert lamina("stop", "svc").returncode == 0
    assert "bye" in lamina("logs", "svc").stdout
    line = next(x for x in lamina("ps", "-a").stdout.splitlines() if x.endswith("svc"))
    assert "Exited (5)" in line
    assert lamina("ps").stdout.splitlines()[1:] == []
    assert mounts_under(lamina.root) == []  # the rootfs is unmounted once the container exits


def test_stop_kills_after_timeout(lamina, image):
    r = lamina("run", "-d", "--name", "stubborn", image, "sh", "-c", "trap '' TERM; while true; do sleep 0.1; done")
    assert r.returncode == 0, r.stderr
    assert lamina("stop", "-t", "1", "stubborn").returncode == 0
    info = json.loads(lamina("inspect", "stubborn").stdout)[0]
    assert info["State"]["ExitCode"] == 137 and info["State"]["OOMKilled"] is False


def test_kill_sends_signal(lamina, image):
    r = lamina("run", "-d", "--name", "kk", image, "sh", "-c", "trap 'exit 9' USR1; while true; do sleep 0.1; done")
    assert r.returncode == 0, r.stderr
    assert lamina("kill", "-s", "USR1", "kk").returncode == 0
    for _ in range(200):
        info = json.loads(lamina("inspect", "kk").stdout)[0]
        if info["State"]["Status"] == "exited":
            break
    assert info["State"]["ExitCode"] == 9
    r = lamina("kill", "kk")
    assert r.returncode == 1 and "not running" in r.stderr


def test_rm_removes_the_container_layer(lamina, image):
    r = lamina("run", "--name", "layer", image, "sh", "-c", "echo x > /added; rm /etc/group; echo y >> /etc/passwd")
    assert r.returncode == 0, r.stderr
    c = lamina.containers()[0]
    assert (c.upper / "added").exists()
    diff = lamina("diff", "layer").stdout.splitlines()
    assert "A /added" in diff and "D /etc/group" in diff and "C /etc/passwd" in diff and "C /etc" in diff
    assert lamina("rm", "layer").returncode == 0
    assert not c.dir.exists()
    assert lamina("ps", "-a").stdout.splitlines()[1:] == []
    r = lamina("rm", "layer")
    assert r.returncode == 1 and "no such container" in r.stderr


def test_rm_refuses_running_unless_forced(lamina, image):
    r = lamina("run", "-d", "--name", "busy", image, "sleep", "60")
    assert r.returncode == 0, r.stderr
    r = lamina("rm", "busy")
    assert r.returncode == 1 and "running" in r.stderr
    assert lamina("rm", "-f", "busy").returncode == 0
    assert lamina.containers() == [] and mounts_under(lamina.root) == []


def test_ps_tells_the_truth_after_the_supervisor_dies(lamina, image):
    r = lamina("run", "-d", "--name", "orphan", image, "sleep", "60")
    assert r.returncode == 0, r.stderr
    c = lamina.containers()[0]
    dirs = cgroup_dirs(c)
    assert dirs and all(d.is_dir() for d in dirs)
    os.kill(c.data["shim_pid"], signal.SIGKILL)
    os.kill(c.data["pid"], signal.SIGKILL)
    line = ""
    for _ in range(200):
        line = next(x for x in lamina("ps", "-a").stdout.splitlines() if x.endswith("orphan"))
        if "Dead" in line:
            break
    assert "Dead" in line
    assert lamina("rm", "orphan").returncode == 0
    assert mounts_under(lamina.root) == [] and lamina.containers() == []
    assert not any(d.exists() for d in dirs)


def test_rm_flag_leaves_nothing(lamina, image):
    r = lamina("run", "--rm", image, "sh", "-c", "cat /proc/self/cgroup")
    assert r.returncode == 0, r.stderr
    # inside the cgroup namespace the container's cgroup is its root
    assert all(line.endswith(":/") for line in r.stdout.splitlines())
    assert lamina.containers() == [] and mounts_under(lamina.root) == []
    r = lamina("run", "-d", "--rm", image, "sh", "-c", "read x")  # stdin is /dev/null: exits at once
    assert r.returncode == 0, r.stderr
    dirs: list = []
    for _ in range(1500):  # polling for the supervisor's cleanup; bounded so a bug fails instead of hanging
        cs = lamina.containers()
        if not cs:
            break
        dirs = dirs or (cgroup_dirs(cs[0]) if cs[0].data.get("cgroup") else [])
        time.sleep(0.02)
    assert lamina.containers() == [] and mounts_under(lamina.root) == []
    assert not any(d.exists() for d in dirs)


@pytest.mark.parametrize("args, msg", [
    (["-m", "1k"], "memory"),
    (["-m", "lots"], "memory"),
    (["--memory-swap", "64m"], "memory"),
    (["--cpus", "abc"], "cpus"),
    (["--cpus", "1000"], "cpus"),
    (["-v", "a:b:c:d"], "volume"),
    (["-v", "/h:relative"], "absolute"),
    (["--device-read-bps", "/dev/null:1mb"], "block device"),
    (["-u", "nosuchuser"], "user"),
    (["--name", "bad name"], "name"),
    (["--bogus-flag"], "bogus"),
])
def test_bad_input_exits_125_leaving_nothing(lamina, image, args, msg):
    r = lamina("run", "--rm", *args, image, "true")
    assert r.returncode == 125, r.stderr
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) <= 3
    assert lamina.containers() == [] and mounts_under(lamina.root) == []
    left = [p.name for p in (lamina.root / "containers").iterdir()] if (lamina.root / "containers").exists() else []
    assert left in ([], [".names.lock"])  # the lock that reserves names stays
    assert lamina("volume", "ls", "-q").stdout.split() == []


def test_unknown_image_exits_125(lamina):
    r = lamina("run", "--rm", "/no/such/dir", "true")
    assert r.returncode == 125 and "no such image" in r.stderr
    r = lamina("run", "--rm", "nosuchimage:latest", "true")
    assert r.returncode == 125 and "nosuchimage" in r.stderr
    assert lamina.containers() == []


def test_name_conflict(lamina, image):
    assert lamina("run", "--name", "twice", image, "true").returncode == 0
    r = lamina("run", "--name", "twice", image, "true")
    assert r.returncode == 125 and "already in use" in r.stderr


def test_interactive_stdin_env_workdir_user(lamina, image):
    r = lamina("run", "--rm", "-i", "-e", "GREETING=hi there", "-w", "/work/dir", "-u", "1000", image, "sh", "-c",
               "cat; echo \"$GREETING\"; pwd; id -u; echo $HOME", input="from stdin\n", stdin=None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["from stdin", "hi there", "/work/dir", "1000", "/home/user"]
    # without -i stdin is /dev/null
    r = lamina("run", "--rm", image, "cat", input="ignored\n", stdin=None)
    assert r.returncode == 0 and r.stdout == ""


def test_logs_of_a_foreground_container(lamina, image):
    r = lamina("run", "--name", "fg", image, "sh", "-c", "echo out; echo err >&2")
    assert r.stdout == "out\n" and r.stderr == "err\n"
    logs = lamina("logs", "fg").stdout
    assert "out\n" in logs and "err\n" in logs


def test_image_config_is_used_as_docker_does(lamina, busybox_dir):
    r = lamina("import", str(busybox_dir), "-t", "configured:1",
               "-c", 'ENTRYPOINT ["/bin/sh", "-c", "echo $0 $FOO $(pwd) $(id -u)"]', "-c", 'CMD ["default"]',
               "-c", "ENV FOO=bar", "-c", "WORKDIR /srv", "-c", "USER 1000")
    assert r.returncode == 0, r.stderr
    assert lamina("run", "--rm", "configured:1").stdout == "default bar /srv 1000\n"
    assert lamina("run", "--rm", "configured:1", "mine").stdout == "mine bar /srv 1000\n"
    r = lamina("run", "--rm", "-u", "0", "-w", "/tmp", "-e", "FOO=baz", "configured:1")
    assert r.stdout == "default baz /tmp 0\n", r.stderr


def test_rm_cleans_up_after_a_killed_lamina_run(lamina, image):
    # lamina itself killed with SIGKILL while the container runs: no supervisor is left, yet `rm` cleans up all
    p = lamina.popen("run", "--name", "crashed", image, "sh", "-c", "echo up; sleep 60")
    try:
        assert p.stdout.readline().strip() == "up"
        c = lamina.containers()[0]
        dirs = cgroup_dirs(c)
        p.kill()
        p.wait()
        assert "Up " in next(x for x in lamina("ps").stdout.splitlines() if x.endswith("crashed"))
        assert lamina("rm", "-f", "crashed").returncode == 0
        assert lamina.containers() == [] and mounts_under(lamina.root) == []
        assert not any(d.exists() for d in dirs)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_logs_follow_ends_with_the_container(lamina, image):
    r = lamina("run", "-d", "--name", "chatty", image, "sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.2; done")
    assert r.returncode == 0, r.stderr
    r = lamina("logs", "-f", "chatty", timeout=60)
    assert r.returncode == 0
    assert r.stdout.split() == ["line1", "line2", "line3"]


def test_wait_prints_the_exit_code(lamina, image):
    r = lamina("run", "-d", "--name", "waited", image, "sh", "-c", "sleep 0.3; exit 6")
    assert r.returncode == 0, r.stderr
    r = lamina("wait", "waited", timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "6"
    assert lamina("wait", "waited").stdout.strip() == "6"  # already exited: answers at once
    r = lamina("wait", "nope")
    assert r.returncode == 1 and "no such container" in r.stderr


def test_concurrent_runs_with_one_name_make_one_container(lamina, image):
    """The name is reserved atomically: of runs started together, one makes the container, the rest get Docker's
    conflict error (9 of 10 trials made two before)."""
    for trial in range(3):
        name = f"same{trial}"
        procs = [lamina.popen("run", "-d", "--name", name, image, "sleep", "600") for _ in range(8)]
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        winners = [r for r in results if r[0] == 0]
        assert len(winners) == 1, results
        for code, _, err in results:
            if code != 0:
                assert code == 125 and err.startswith(f'lamina: Conflict. The container name "/{name}" is already '
                                                      f'in use by container "'), err
        named = [c for c in lamina.containers() if c.name == name]
        assert len(named) == 1 and named[0].id == winners[0][1].strip()
        assert named[0].status() == "running"
    # the losers left nothing: only the three winners exist
    assert sorted(c.name for c in lamina.containers()) == ["same0", "same1", "same2"]


def _create_named(root: str, name: str, barrier) -> str:
    barrier.wait()
    try:
        state.create(root, state.new_id(), {"name": name})
        return "created"
    except state.NameConflict:
        return "conflict"


def test_name_reservation_is_atomic(lamina):
    """16 creations of one name released at once by a barrier: exactly one record, 15 conflicts."""
    import multiprocessing  # noqa: PLC0415

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Manager().Barrier(16)
    with ctx.Pool(16) as pool:
        got = pool.starmap(_create_named, [(str(lamina.root), "racy", barrier)] * 16)
    assert sorted(got) == ["conflict"] * 15 + ["created"]
    assert [c.name for c in lamina.containers()] == ["racy"]


def _deep_tree(top: Path, depth: int) -> None:
    """`depth` nested directories below `top`, a file and a whiteout-like node in each: built through descriptors,
    since the path grows past PATH_MAX."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d" * 8, dir_fd=fd)
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        os.mknod("w", 0o600 | 0o020000, 0, dir_fd=fd)
        nxt = os.open("d" * 8, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)


def test_rm_of_a_container_with_a_very_deep_tree(lamina, image):
    """A container layer 1,200 directories deep (its paths longer than PATH_MAX): rm raised RecursionError and
    the container could not be removed."""
    assert lamina("run", "--name", "deep", image, "true").returncode == 0
    c = state.find(lamina.root, "deep")
    _deep_tree(c.upper, 1200)
    r = lamina("rm", "deep")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert not c.dir.exists() and lamina.containers() == []


def test_volume_rm_of_a_very_deep_tree(lamina):
    assert lamina("volume", "create", "deepvol").returncode == 0
    _deep_tree(lamina.root / "volumes/deepvol/_data", 1200)
    r = lamina("volume", "rm", "deepvol")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert not (lamina.root / "volumes/deepvol").exists()
