"""Operations on existing containers: signals, stop, remove, the container layer's diff, and `ps`/`inspect` views.

A container whose supervisor died is still handled: its status is computed from the init's pid and start time (not
just the pid, which may have been reused), and `stop`/`rm` do the supervisor's cleanup themselves.
"""
from __future__ import annotations

import os
import signal
import stat
import time

from store.errors import StoreError

from . import state


class LifecycleError(Exception):
    pass


def parse_signal(text: str) -> int:
    t = text.upper()
    if t.isdigit():
        n = int(t)
        if 0 < n < signal.NSIG:
            return n
    else:
        name = t if t.startswith("SIG") else "SIG" + t
        if hasattr(signal.Signals, name):
            return int(signal.Signals[name])
    raise LifecycleError(f"invalid signal: {text}")


def kill(c: state.Container, sig: int) -> None:
    if c.status() != "running":
        raise LifecycleError(f"container {c.id[:12]} is not running")
    os.kill(c.data["pid"], sig)


def wait_exit(root: str, c: state.Container, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not c.init_alive():
            break
        time.sleep(0.02)
    else:
        return False
    # The supervisor records the exit; if it is gone too, record it here.
    for _ in range(250):
        try:
            c.reload()
        except (OSError, ValueError):
            return True  # removed (--rm)
        if c.data.get("status") != "running":
            return True
        if not c.shim_alive():
            break
        time.sleep(0.02)
    _settle_dead(root, c)
    return True


def _settle_dead(root: str, c: state.Container, code: int = 137) -> None:
    from .run import cleanup  # noqa: PLC0415 - `lamina run` loads the runtime only after forking its FS daemon

    if c.dir.exists() and c.data.get("status") == "running":
        c.update(status="exited", exit_code=code, finished_at=time.time(), pid=None)
        cleanup(root, c)


def stop(root: str, c: state.Container, timeout: float = 10) -> None:
    """SIGTERM to the init (forwarded to the command), SIGKILL after `timeout` seconds."""
    st = c.status()
    if st == "dead":
        _settle_dead(root, c)
        return
    if st != "running":
        return
    try:
        os.kill(c.data["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    if not wait_exit(root, c, timeout):
        try:
            os.kill(c.data["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_exit(root, c, 30)


def remove(root: str, c: state.Container, force: bool = False) -> None:
    st = c.status()
    if st == "running":
        if not force:
            raise LifecycleError(f"cannot remove container {c.id[:12]}: container is running: stop the container "
                                 f"before removing or force remove")
        try:
            os.kill(c.data["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_exit(root, c, 30)
        if not c.dir.exists():
            return
    from .run import cleanup, remove_container  # noqa: PLC0415

    # Whatever the supervisor did or did not do: no mount, cgroup or directory stays.
    c.data["rm"] = False
    cleanup(root, c)
    remove_container(root, c)


def diff(c: state.Container) -> list[tuple[str, str]]:
    """(kind, path) for the container layer as `docker diff`: A added, C changed, D deleted; sorted by path."""
    from .commit import layer_changes  # noqa: PLC0415 - `lamina run` loads the runtime only after forking its FS daemon

    try:
        with layer_changes(str(c.dir.parent.parent), c) as chs:
            out = [(ch.kind, ch.path, ch.rec) for ch in chs if ch.path != "/"]
    except StoreError as e:
        raise LifecycleError(f"container {c.id[:12]}: {e}") from None
    hidden = set(c.data.get("etc_files", []))  # mount points of lamina's own /etc files, as Docker hides them
    out = [(k, p, r) for k, p, r in out
           if not (p in hidden and r is not None and stat.S_ISREG(r.mode) and r.size == 0)]
    out.sort(key=lambda t: t[1])
    # A directory copied up only to hold those mount points is not a change either.
    holders = {os.path.dirname(h) for h in hidden}
    visible = [p for _, p, _ in out]
    return [(k, p) for k, p, _ in out
            if not (k == "C" and p in holders and not any(v.startswith(p + "/") for v in visible))]


def _ago(t: float) -> str:
    d = max(0, int(time.time() - t))
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if d >= n:
            k = d // n
            return f"{k} {unit}{'s' if k > 1 else ''}"
    return f"{d} second{'s' if d != 1 else ''}" if d else "Less than a second"


def status_text(c: state.Container) -> str:
    st = c.status()
    if st == "running":
        return f"Up {_ago(c.data.get('started_at', time.time()))}"
    if st == "exited":
        code = c.data.get("exit_code")
        oom = " (OOMKilled)" if c.data.get("oom_killed") else ""
        return f"Exited ({code}) {_ago(c.data.get('finished_at', time.time()))} ago{oom}"
    if st == "dead":
        return "Dead"
    return "Created"


def ps_rows(root: str, all_: bool) -> list[list[str]]:
    rows = [["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"]]
    for c in state.list_containers(root):
        if not all_ and c.status() != "running":
            continue
        cmd = " ".join(c.data.get("argv", []))
        cmd = '"' + (cmd if len(cmd) <= 20 else cmd[:19] + "…") + '"'
        rows.append([c.id[:12], c.data.get("image", ""), cmd, _ago(c.data.get("created", time.time())) + " ago",
                     status_text(c), c.name])
    return rows


def inspect(c: state.Container) -> dict:
    st = c.status()
    d = c.data
    return {
        "Id": c.id, "Name": "/" + c.name, "Image": d.get("image"), "Path": (d.get("argv") or [""])[0],
        "Args": (d.get("argv") or [])[1:], "Created": d.get("created"),
        "State": {"Status": st, "Running": st == "running", "Pid": d.get("pid") or 0,
                  "ExitCode": d.get("exit_code", 0), "OOMKilled": bool(d.get("oom_killed")),
                  "Error": d.get("error", ""), "StartedAt": d.get("started_at"), "FinishedAt": d.get("finished_at")},
        "Config": {"Hostname": d.get("hostname"), "Tty": d.get("tty", False), "Image": d.get("image"),
                   **(d.get("config") or {"Env": d.get("env"), "Cmd": d.get("argv"), "WorkingDir": d.get("cwd"),
                                          "User": d.get("user")})},
        "HostConfig": {"NetworkMode": d.get("network"), "UsernsMode": "private" if d.get("userns") else "",
                       "AutoRemove": d.get("rm", False)},
        "Mounts": d.get("mounts", []), "GraphDriver": {"Data": {"UpperDir": str(c.upper), "WorkDir": str(c.work),
                                                                 "MergedDir": str(c.rootfs)}},
        "Cgroup": d.get("cgroup"),
    }
