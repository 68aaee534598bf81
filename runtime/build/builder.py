"""`lamina build`: a parsed Dockerfile executed step by step, each step one image, keyed in the build cache.

Every instruction makes an image: RUN, COPY and ADD one with a new layer, the others one with a new config and an
`empty_layer` history entry (so `lamina history` reads as `docker history`). RUN runs in a container of lamina's
own runtime on its union filesystem (network none unless asked); the container's upper directory is read by
`unionfs.changes` and stored as the layer, so a step costs what it changed. COPY and ADD write their files as a
layer tar directly, without a container.

Cache keys follow BuildKit (docs/dev/solver.md): sha256 of the parent step's key, the instruction after ARG/ENV
substitution (with the build args a RUN sees), and for COPY/ADD a checksum of what is copied (names, contents,
modes, owners; never mtimes). A hit reuses the image the step made before; intermediate images are untagged, kept
by their cache rows until `lamina gc` (which drops them and their rows) or `lamina builder prune`. While a build
runs, the images it stands on are held (holder `build:<pid>:<stage>`), so a concurrent gc cannot take them; tags
are written only once the last step succeeded.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, TextIO

from store import buildcache
from store.holds import hold, release
from store.importer import commit_image
from store.reader import load_image, resolve
from store.refs import normalize_ref
from store.root import Store

from .dockerfile import Dockerfile, DockerfileError, Instruction, Stage, expand, key_values, parse, words
from .sources import (DirTree, ImageTree, SourceError, Tree, archive_items, checksum, follow, plan,
                      read_dockerignore, resolve_sources, write_items)

DEFAULT_SHELL = ["/bin/sh", "-c"]
NOP = "/bin/sh -c #(nop) "
BUILD_CONTAINER = "lamina-build-"  # + builder pid + step: a dead builder's containers are removed by the next build


class BuildError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Options:
    context: str
    dockerfile: str | None = None
    tags: list[str] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    quiet: bool = False
    network: str = "none"


@dataclass
class StageState:
    stage: Stage
    image_id: str | None = None       # None: scratch with no step yet
    key: str = ""
    config: dict = field(default_factory=dict)
    args: dict[str, str | None] = field(default_factory=dict)  # ARGs declared in this stage
    cmd_set: bool = False


def _interrupted(sig: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {sig}")


def _key(parent: str, *parts: str) -> str:
    h = hashlib.sha256(parent.encode())
    for p in parts:
        h.update(b"\0" + p.encode())
    return h.hexdigest()


def _env_dict(cfg: dict) -> dict[str, str]:
    out = {}
    for e in cfg.get("Env") or []:
        k, _, v = e.partition("=")
        out[k] = v
    return out


def _set_env(cfg: dict, pairs: list[tuple[str, str]]) -> None:
    env = _env_dict(cfg)
    env.update(pairs)
    cfg["Env"] = [f"{k}={v}" for k, v in env.items()]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)")
_UNIT = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}


def _duration(text: str, where: str) -> int:
    if not text or _DURATION.sub("", text):
        raise DockerfileError(f"{where}: invalid duration {text!r}")
    return int(sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(text)))


class Builder:
    def __init__(self, root: str, opts: Options, out: TextIO | None = None) -> None:
        self.root = root
        self.opts = opts
        self.out = out or sys.stdout
        self.context = os.path.abspath(opts.context)
        if not os.path.isdir(self.context):
            raise BuildError(f"build context {opts.context!r} is not a directory")
        self.path = opts.dockerfile or os.path.join(self.context, "Dockerfile")
        if opts.dockerfile and not os.path.isabs(opts.dockerfile) and not os.path.exists(opts.dockerfile):
            self.path = os.path.join(self.context, opts.dockerfile)
        self.df: Dockerfile = parse(self.path)
        self.store = Store(root)
        self.done: list[StageState] = []
        self.used_args: set[str] = set()
        self.step = 0
        self.holders: list[str] = []
        self.stages = self._stages()
        self.total = sum(1 + len(s.instructions) for s in self.stages)
        for t in opts.tags:
            normalize_ref(t)  # a bad tag fails before anything runs

    def _stages(self) -> list[Stage]:
        stages = self.df.stages
        if self.opts.target is None:
            return stages
        for s in stages:
            if s.name == self.opts.target.lower():
                return stages[:s.index + 1]
        raise BuildError(f"target stage {self.opts.target!r} could not be found")

    def say(self, text: str) -> None:
        if not self.opts.quiet:
            print(text, file=self.out, flush=True)

    # -- the build ---------------------------------------------------------------------------------------------

    def build(self) -> str:
        self._release_stale_holds()
        # SIGTERM and SIGHUP end the build as Ctrl-C does: through the finally blocks that remove the step's
        # container and mount and release the holds; no tag is written before the last step succeeded.
        saved = {s: signal.signal(s, _interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            for stage in self.stages:
                self.done.append(self._stage(stage))
            final = self.done[-1]
            if final.image_id is None:
                final.image_id = self._commit(final, None, "FROM scratch")
            with self.store.write() as db:
                for t in self.opts.tags:
                    db.execute("INSERT OR REPLACE INTO tags(name, image_id) VALUES (?, ?)",
                               (normalize_ref(t), final.image_id))
            unused = sorted(set(self.opts.build_args) - self.used_args)
            if unused:
                print(f"[Warning] one or more build args were not consumed: {' '.join(unused)}", file=sys.stderr)
            return final.image_id
        finally:
            for sig, h in saved.items():
                signal.signal(sig, h)
            for h in self.holders:
                try:
                    release(self.store, h)
                except Exception:  # noqa: BLE001 - a hold left behind is cleared by the next build of this pid
                    pass
            self.store.close()

    def _release_stale_holds(self) -> None:
        """What builds killed outright (SIGKILL) left: their step containers (processes, mount, cgroup, upper) and
        their holds, so gc may reclaim."""
        from runtime import lifecycle, state  # noqa: PLC0415
        from runtime.state import proc_start_time  # noqa: PLC0415

        for c in state.list_containers(self.root):
            pid = (c.name or "")[len(BUILD_CONTAINER):].split("-")[0]
            if (c.name or "").startswith(BUILD_CONTAINER) and pid.isdigit() and proc_start_time(int(pid)) is None:
                try:
                    lifecycle.remove(self.root, c, force=True)
                except Exception as e:  # noqa: BLE001 - reported; the build goes on
                    print(f"lamina: removing {c.name} of a dead build: {e}", file=sys.stderr)
        for (holder,) in self.store.db.execute("SELECT holder FROM holds WHERE holder LIKE 'build:%'").fetchall():
            pid = holder.split(":")[1]
            if pid.isdigit() and proc_start_time(int(pid)) is None:
                release(self.store, holder)

    def _hold(self, st: StageState) -> None:
        if st.image_id is None:
            return
        h = f"build:{os.getpid()}:{st.stage.index}"
        hold(self.store, h, st.image_id)
        if h not in self.holders:
            self.holders.append(h)

    def _global_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for ins in self.df.global_args:
            for k, v in key_values(ins, env, self.path, self.df.escape):
                if k in self.opts.build_args:
                    self.used_args.add(k)
                    env[k] = self.opts.build_args[k]
                elif v is not None:
                    env[k] = v
        return env

    def _stage(self, stage: Stage) -> StageState:
        self.step += 1
        gl = self._global_env()
        base = expand(stage.base, gl, f"{self.path}:{stage.line}", self.df.escape)
        text = f"FROM {base}" + (f" AS {stage.name}" if stage.name else "")
        self.say(f"STEP {self.step}/{self.total}: {text}")
        if stage.platform:
            print(f"[Warning] FROM --platform={stage.platform} ignored: lamina builds for this host only",
                  file=sys.stderr)
        st = StageState(stage)
        prev = next((d for d in self.done if d.stage.name == base.lower()), None)
        if base.lower() == "scratch":
            st.key = _key("", "FROM scratch")
        else:
            if prev is not None:
                st.image_id = prev.image_id
            else:
                st.image_id = self._find_image(base, stage.line)
            if st.image_id is None:
                st.key = _key("", "FROM scratch")
            else:
                st.key = _key("", "FROM", st.image_id)
                st.config = dict(json.loads(load_image(self.store, st.image_id).config_bytes).get("config") or {})
        self._hold(st)
        self._onbuild(st, stage)
        for ins in stage.instructions:
            self.step += 1
            self._instruction(st, ins)
            self._hold(st)
        return st

    def _onbuild(self, st: StageState, stage: Stage) -> None:
        """The base image's ONBUILD triggers, run right after FROM as docker does; the image they make no longer
        carries them."""
        triggers = st.config.get("OnBuild") or []
        if not triggers:
            return
        st.config["OnBuild"] = None
        for text in triggers:
            try:
                ins = parse(self.path, "FROM scratch\n" + text + "\n").stages[0].instructions[0]
            except DockerfileError as e:
                raise BuildError(f"{self.path}:{stage.line}: ONBUILD trigger of the base image {text!r}: "
                                 f"{str(e).split(': ', 1)[-1]}") from None
            ins.line, ins.original = stage.line, f"{ins.original} (ONBUILD trigger)"
            self._instruction(st, ins)
            self._hold(st)

    def _find_image(self, ref: str, line: int) -> str:
        try:
            return resolve(self.store, ref)
        except Exception as e:  # noqa: BLE001 - the store's errors are one line
            raise BuildError(f"{self.path}:{line}: FROM {ref}: {e} (pull it first: lamina pull {ref})") from None

    def _scope(self, st: StageState) -> dict[str, str]:
        """What substitution sees: the stage's ARGs, overridden by its ENV (Docker's precedence)."""
        env = {k: v for k, v in st.args.items() if v is not None}
        env.update(_env_dict(st.config))
        return env

    def _instruction(self, st: StageState, ins: Instruction) -> None:
        where = ins.where(self.path)
        env = self._scope(st)
        name = ins.name
        if name in ("COPY", "ADD"):
            return self._copy(st, ins, env)
        if name == "RUN":
            return self._run(st, ins)
        args = expand(ins.args, env, where, self.df.escape) if name in ("EXPOSE", "STOPSIGNAL", "USER", "VOLUME",
                                                                         "WORKDIR") else ins.args
        cfg = json.loads(json.dumps(st.config))
        text = f"{name} {args}"
        if name == "ARG":
            pairs = key_values(ins, env, self.path, self.df.escape)
            gl = self._global_env()
            shown = []
            for k, v in pairs:
                if k in self.opts.build_args:
                    self.used_args.add(k)
                    v = self.opts.build_args[k]
                elif v is None:
                    v = gl.get(k)
                st.args[k] = v
                shown.append(k if v is None else f"{k}={v}")
            text = "ARG " + " ".join(shown)
        elif name == "ENV":
            pairs = key_values(ins, env, self.path, self.df.escape)
            _set_env(cfg, pairs)
            text = "ENV " + " ".join(f"{k}={v}" for k, v in pairs)
        elif name == "LABEL":
            pairs = key_values(ins, env, self.path, self.df.escape)
            cfg.setdefault("Labels", {}).update(pairs)
            text = "LABEL " + " ".join(f"{k}={v}" for k, v in pairs)
        elif name == "WORKDIR":
            cfg["WorkingDir"] = posixpath.normpath(posixpath.join(cfg.get("WorkingDir") or "/", args))
        elif name == "USER":
            cfg["User"] = args
        elif name in ("CMD", "ENTRYPOINT"):
            argv = ins.json if ins.json is not None else [*(cfg.get("Shell") or DEFAULT_SHELL), ins.args]
            if ins.json is None and not ins.args:
                argv = []
            if name == "CMD":
                cfg["Cmd"] = argv
                st.cmd_set = True
            else:
                cfg["Entrypoint"] = argv
                if not st.cmd_set:
                    cfg["Cmd"] = None
            text = f"{name} {json.dumps(argv)}"
        elif name == "EXPOSE":
            for p in args.split():
                port = p if "/" in p else f"{p}/tcp"
                if not re.fullmatch(r"\d+(-\d+)?/(tcp|udp|sctp)", port.lower()):
                    raise DockerfileError(f"{where}: invalid port {p!r}")
                cfg.setdefault("ExposedPorts", {})[port.lower()] = {}
        elif name == "VOLUME":
            vols = ins.json if ins.json is not None else args.split()
            for v in vols:
                if not v:
                    raise DockerfileError(f"{where}: VOLUME specified can not be an empty string")
                cfg.setdefault("Volumes", {})[v] = {}
        elif name == "STOPSIGNAL":
            cfg["StopSignal"] = args
        elif name == "SHELL":
            if ins.json is None:
                raise DockerfileError(f"{where}: SHELL requires the JSON form, e.g. SHELL [\"/bin/sh\", \"-c\"]")
            cfg["Shell"] = ins.json
        elif name == "HEALTHCHECK":
            cfg["Healthcheck"] = self._healthcheck(ins, cfg, where)
        elif name == "ONBUILD":
            cfg["OnBuild"] = [*(cfg.get("OnBuild") or []), ins.args]
        elif name == "MAINTAINER":
            pass
        key = _key(st.key, text)
        self._step(st, ins, key, lambda: self._commit(st, None, NOP + " " + text, cfg), new_config=cfg)

    def _healthcheck(self, ins: Instruction, cfg: dict, where: str) -> dict:
        head, _, rest = ins.args.partition(" ")
        if head.upper() == "NONE":
            return {"Test": ["NONE"]}
        if head.upper() != "CMD":
            raise DockerfileError(f"{where}: HEALTHCHECK takes NONE or CMD ...")
        rest = rest.strip()
        from .dockerfile import _json_form  # noqa: PLC0415
        j = _json_form(rest)
        hc: dict = {"Test": ["CMD", *j] if j is not None else ["CMD-SHELL", rest]}
        for flag, field_ in (("interval", "Interval"), ("timeout", "Timeout"), ("start-period", "StartPeriod"),
                             ("start-interval", "StartInterval")):
            if flag in ins.flags:
                hc[field_] = _duration(ins.flags[flag], where)
        if "retries" in ins.flags:
            if not ins.flags["retries"].isdigit():
                raise DockerfileError(f"{where}: --retries must be a number")
            hc["Retries"] = int(ins.flags["retries"])
        return hc

    def _step(self, st: StageState, ins: Instruction, key: str, make: Callable[[], str],
              new_config: dict | None = None) -> None:
        self.say(f"STEP {self.step}/{self.total}: {ins.original.splitlines()[0] if ins.original else ins.name}")
        hit = None if self.opts.no_cache else buildcache.lookup(self.store, key)
        if hit is not None:
            self.say(f"--> Using cache {hit[7:19]}")
            st.image_id = hit
            st.config = dict(json.loads(load_image(self.store, hit).config_bytes).get("config") or {})
        else:
            st.image_id = make()
            buildcache.record(self.store, key, st.image_id)
            if new_config is not None:
                st.config = new_config
            else:
                st.config = dict(json.loads(load_image(self.store, st.image_id).config_bytes).get("config") or {})
        st.key = key
        self.say(f"--> {st.image_id[7:19]}")

    def _commit(self, st: StageState, write: Callable[[BinaryIO], None] | None, created_by: str,
                cfg: dict | None = None) -> str:
        return commit_image(self.store, st.image_id, write, {"created_by": created_by},
                            config=cfg if cfg is not None else st.config)

    # -- RUN -------------------------------------------------------------------------------------------------

    def _run(self, st: StageState, ins: Instruction) -> None:
        shell = st.config.get("Shell") or DEFAULT_SHELL
        argv = ins.json if ins.json is not None else [*shell, ins.args]
        # build args in scope reach RUN as environment, below the image's ENV, and are part of its key
        env = _env_dict(st.config)
        args = {k: v for k, v in st.args.items() if v is not None and k not in env}
        shown = f"|{len(args)} " + " ".join(f"{k}={v}" for k, v in sorted(args.items())) + " " if args else ""
        created_by = shown + (" ".join(argv) if ins.json is None else json.dumps(argv))
        key = _key(st.key, "RUN", json.dumps(argv), json.dumps(sorted(args.items())))
        self._step(st, ins, key, lambda: self._run_container(st, argv, args, created_by))

    def _run_container(self, st: StageState, argv: list[str], args: dict[str, str], created_by: str) -> str:
        from runtime import run as rt  # noqa: PLC0415
        from runtime.commit import _excluded, _without_placeholders, layer_changes  # noqa: PLC0415
        from runtime.spec import RunSpec, SpecError  # noqa: PLC0415
        from unionfs.changes import write_layer  # noqa: PLC0415

        if st.image_id is None:
            raise BuildError(f"step {self.step}: RUN in an empty (scratch) image: there is no shell to run it")
        spec = RunSpec(image=st.image_id, cmd=argv, env=[f"{k}={v}" for k, v in args.items()],
                       name=f"{BUILD_CONTAINER}{os.getpid()}-{self.step}",
                       workdir=st.config.get("WorkingDir") or None, user=st.config.get("User") or None,
                       network=self.opts.network)
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                                                  signal.SIGUSR1, signal.SIGUSR2)}
        c = None
        quiet = self._quiet_stdout()
        try:
            # no SQLite connection may cross the fork of the union filesystem's daemon (it reopens lazily)
            self.store.close()
            try:
                p = rt.prepare(self.root, spec)
            except (SpecError, LookupError, OSError) as e:
                raise BuildError(f"step {self.step}: RUN: {e}", 125) from None
            c = p.container
            p.launch.process.argv = argv  # RUN runs its command, never the image's entrypoint
            with quiet:
                code = rt.supervise(self.root, p, "relay", False)
            if code != 0:
                raise BuildError(f"step {self.step}/{self.total}: RUN {' '.join(argv)}: "
                                 f"returned a non-zero code: {code}", code)
            c = c.reload()
            with layer_changes(self.root, c) as chs:
                keep = _without_placeholders(chs, _excluded(c))
                return self._commit(st, lambda out: write_layer(keep, out), created_by)
        finally:
            for s, h in saved.items():
                signal.signal(s, h)
            if c is not None:
                rt.remove_container(self.root, c)

    @contextmanager
    def _quiet_stdout(self) -> Iterator[None]:
        """-q: the RUN command's output goes nowhere, as docker build -q has it."""
        if not self.opts.quiet:
            yield
            return
        sys.stdout.flush()
        saved = os.dup(1)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)

    # -- COPY / ADD ------------------------------------------------------------------------------------------

    def _copy(self, st: StageState, ins: Instruction, env: dict[str, str]) -> None:
        where = ins.where(self.path)
        name = ins.name
        flags = {k: expand(v, env, where, self.df.escape) for k, v in ins.flags.items()}
        parts = ins.json if ins.json is not None else words(ins.args, env, where, self.df.escape)
        if ins.json is not None:
            parts = [expand(p, env, where, self.df.escape) for p in parts]
        if len(parts) < 2:
            raise DockerfileError(f"{where}: {name} requires at least two arguments: SRC... DEST")
        srcs, dest = parts[:-1], parts[-1]
        if name == "ADD":
            for s in srcs:
                if re.match(r"^[a-z][a-z0-9+.-]*://", s, re.I) or s.startswith("git@"):
                    raise BuildError(f"{where}: ADD {s}: builds here are offline; download it into the build "
                                     "context and ADD or COPY it from there")
        chmod = None
        if "chmod" in flags:
            if not re.fullmatch(r"[0-7]{3,4}", flags["chmod"]):
                raise DockerfileError(f"{where}: --chmod={flags['chmod']}: expected an octal mode such as 0755")
            chmod = int(flags["chmod"], 8)
        image_tree = ImageTree(self.root, list(load_image(self.store, st.image_id).layer_ids)
                               if st.image_id else [])
        try:
            owner = self._owner(flags["chown"], image_tree, where) if "chown" in flags else None
            src_tree, confined, src_tree_close = self._source_tree(flags.get("from"), where)
            try:
                found = resolve_sources(src_tree, srcs, name, confined)
                wd = st.config.get("WorkingDir") or "/"
                dest_abs = posixpath.join(wd, dest)
                # "." and ".." name directories as a trailing "/" does (BuildKit's rule)
                want_dir = (dest.endswith(("/", "/.", "/..")) or dest in (".", "..") or len(srcs) > 1
                            or len(found) > 1)
                resolved = "/" + follow(image_tree, dest_abs.lstrip("/"), name, dest, confined=False)
                dstat = image_tree.lstat(resolved.lstrip("/"))
                is_dir = want_dir or (dstat is not None and (dstat.mode & 0o170000) == 0o040000)
                unpack = (lambda rel, _s: archive_items(os.path.join(self.context, rel))) if (
                    name == "ADD" and confined) else None
                items = plan(src_tree, found, resolved, is_dir, owner, chmod, unpack)
                new_dirs = self._new_dirs(image_tree, items, resolved if is_dir else posixpath.dirname(resolved))
                sums = checksum(items)
                text = f"{name} " + " ".join(f"--{k}={v}" for k, v in sorted(flags.items())) + \
                    f" {json.dumps(srcs)} {dest}"
                key = _key(st.key, text, sums)
                created_by = f"{NOP}{name} {' '.join(f'--{k}={v}' for k, v in sorted(flags.items()))}" \
                    f"{' ' if flags else ''}{' '.join(srcs)} {dest}"
                self._step(st, ins, key, lambda: self._commit(
                    st, lambda out: write_items(items, new_dirs, owner, out), created_by))
            finally:
                src_tree_close()
        except SourceError as e:
            raise BuildError(f"{where}: {e}") from None
        finally:
            image_tree.close()

    def _source_tree(self, frm: str | None, where: str) -> tuple[Tree, bool, Callable[[], None]]:
        if frm is None:
            return DirTree(self.context, read_dockerignore(self.context)), True, lambda: None
        stage = next((d for d in self.done if d.stage.name == frm.lower() or str(d.stage.index) == frm), None)
        if stage is not None:
            image_id = stage.image_id
        else:
            if any(s.name == frm.lower() for s in self.df.stages):
                raise BuildError(f"{where}: --from={frm}: that stage comes later, or is this one")
            image_id = self._find_image(frm, int(where.rsplit(":", 1)[1]))
        t = ImageTree(self.root, list(load_image(self.store, image_id).layer_ids) if image_id else [])
        return t, False, t.close

    def _owner(self, spec: str, tree: ImageTree, where: str) -> tuple[int, int]:
        user, _, group = spec.partition(":")

        def lookup(name: str, file: str, what: str) -> int:
            if name.isdigit():
                return int(name)
            try:
                fd = tree.open(file.lstrip("/"))
                with os.fdopen(fd, "r", errors="replace") as f:
                    for line in f:
                        fields = line.rstrip("\n").split(":")
                        if fields[0] == name and len(fields) > 2 and fields[2].isdigit():
                            return int(fields[2])
            except (OSError, AttributeError, TypeError):
                pass
            raise BuildError(f"{where}: --chown={spec}: no {what} {name!r} in the image's {file}")
        uid = lookup(user, "/etc/passwd", "user")
        gid = lookup(group, "/etc/group", "group") if group else uid
        return uid, gid

    @staticmethod
    def _new_dirs(tree: Tree, items: list, top: str) -> list[str]:
        want: set[str] = set()
        item_paths = {i.dest for i in items}
        for p in [top, *(posixpath.dirname(i.dest) for i in items)]:
            while p not in ("/", "") and p not in want:
                if p not in item_paths and tree.lstat(p.lstrip("/")) is None:
                    want.add(p)
                p = posixpath.dirname(p)
        return sorted(want)


def build(root: str, opts: Options, out: TextIO | None = None) -> str:
    return Builder(root, opts, out).build()
