"""Reading a Dockerfile into stages of checked instructions, and Docker's variable substitution.

dockerfile-parse does the line grammar (the `# escape` directive, line continuations, comments between continued
lines); this module checks what it leaves open: the instruction names (an unknown one is an error with its file and
line, before anything runs), the flags each takes, JSON (exec) forms, and `FROM` opening every stage. Substitution
(`$VAR`, `${VAR}`, `${VAR:-word}`, `${VAR:+word}`, `${VAR-word}`, `${VAR+word}`, the escape character before `$`)
follows Docker's shell lexer (moby/buildkit frontend/dockerfile/shell): single quotes keep `$` literal, double quotes
do not, and `words` also removes the quotes and splits on unquoted blanks, as ENV, ARG and LABEL need.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from dockerfile_parse import DockerfileParser


class DockerfileError(Exception):
    """A Dockerfile that cannot be built; the message names the file and line."""


# Instructions and the flags each accepts (name -> takes a value).
INSTRUCTIONS: dict[str, dict[str, bool]] = {
    "FROM": {"platform": True},
    # BuildKit's RUN --mount/--network/--security, COPY --parents/--exclude, ADD --checksum are not done: refused
    # as unknown rather than ignored. --link changes only how BuildKit stores the layer: accepted.
    "RUN": {},
    "COPY": {"chown": True, "chmod": True, "from": True, "link": False},
    "ADD": {"chown": True, "chmod": True, "link": False},
    "ENV": {}, "ARG": {}, "WORKDIR": {}, "USER": {}, "CMD": {}, "ENTRYPOINT": {}, "LABEL": {}, "EXPOSE": {},
    "VOLUME": {}, "STOPSIGNAL": {}, "HEALTHCHECK": {"interval": True, "timeout": True, "start-period": True,
                                                    "start-interval": True, "retries": True},
    "SHELL": {}, "ONBUILD": {}, "MAINTAINER": {},
}
# The instructions whose arguments Docker substitutes variables in.
SUBSTITUTED = {"ADD", "COPY", "ENV", "EXPOSE", "FROM", "LABEL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR", "ARG"}


@dataclass
class Instruction:
    name: str                      # upper case
    args: str                      # the text after the name and flags
    flags: dict[str, str] = field(default_factory=dict)
    line: int = 0                  # 1-based, where it starts
    original: str = ""             # as written (continuations joined)
    json: list[str] | None = None  # the exec (JSON) form, when given so

    def where(self, path: str) -> str:
        return f"{path}:{self.line}"


@dataclass
class Stage:
    base: str                      # as written (substituted when the build reaches it)
    name: str | None
    index: int
    line: int
    instructions: list[Instruction] = field(default_factory=list)
    platform: str | None = None


@dataclass
class Dockerfile:
    path: str
    global_args: list[Instruction]  # ARGs before the first FROM
    stages: list[Stage]
    escape: str = "\\"


_FLAG = re.compile(r"--([a-z][a-z-]*)(?:=(\S*))?")


def _split_flags(inst: str, text: str, where: str) -> tuple[dict[str, str], str]:
    allowed = INSTRUCTIONS[inst]
    flags: dict[str, str] = {}
    rest = text.lstrip()
    while rest.startswith("--"):
        word, _, after = rest.partition(" ")
        m = _FLAG.fullmatch(word)
        if not m or m.group(1) not in allowed:
            raise DockerfileError(f"{where}: unknown flag {word.split('=')[0]!r} for {inst}")
        if allowed[m.group(1)] and m.group(2) is None:
            raise DockerfileError(f"{where}: flag --{m.group(1)} of {inst} needs a value (--{m.group(1)}=...)")
        flags[m.group(1)] = m.group(2) if m.group(2) is not None else "true"
        rest = after.lstrip()
    return flags, rest


def _json_form(text: str) -> list[str] | None:
    t = text.strip()
    if not t.startswith("["):
        return None
    try:
        v = json.loads(t)
    except ValueError:
        return None  # Docker then takes it as the shell form
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    return None


def parse(path: str, text: str | None = None) -> Dockerfile:
    """Parse and check a whole Dockerfile (from `text` if given, else from `path`)."""
    try:
        if text is None:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise DockerfileError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DockerfileError(f"{path}: not UTF-8 text ({e.reason})") from None
    p = DockerfileParser(fileobj=__import__("io").BytesIO(text.encode()))
    escape = "\\"
    m = re.match(r"(?:#\s*\w+\s*=.*\n)*?#\s*escape\s*=\s*(\S)", text, re.I)
    if m:
        escape = m.group(1)
    global_args: list[Instruction] = []
    stages: list[Stage] = []
    for item in p.structure:
        name = item["instruction"].upper()
        line = item["startline"] + 1
        where = f"{path}:{line}"
        if name == "COMMENT":
            continue
        if name not in INSTRUCTIONS:
            raise DockerfileError(f"{where}: unknown instruction: {item['instruction']}")
        value = item["value"]
        flags, args = _split_flags(name, value, where)
        if not args.strip() and name not in ("CMD", "ENTRYPOINT"):
            raise DockerfileError(f"{where}: {name} requires at least one argument")
        ins = Instruction(name, args.strip(), flags, line, item["content"].strip(), _json_form(args))
        if name == "FROM":
            words = args.split()
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
                raise DockerfileError(f"{where}: FROM takes IMAGE [AS NAME]")
            stage_name = words[2].lower() if len(words) == 3 else None
            if stage_name is not None and not re.fullmatch(r"[a-z][a-z0-9._-]*", stage_name):
                raise DockerfileError(f"{where}: invalid stage name {words[2]!r}")
            if stage_name is not None and any(s.name == stage_name for s in stages):
                raise DockerfileError(f"{where}: duplicate stage name {stage_name!r}")
            stages.append(Stage(words[0], stage_name, len(stages), line, platform=flags.get("platform")))
            continue
        if not stages:
            if name != "ARG":
                raise DockerfileError(f"{where}: {name} before the first FROM (only ARG may come before it)")
            global_args.append(ins)
            continue
        _check(ins, path)
        stages[-1].instructions.append(ins)
    if not stages:
        raise DockerfileError(f"{path}: no FROM instruction: nothing to build")
    return Dockerfile(path, global_args, stages, escape)


def _check(ins: Instruction, path: str) -> None:
    """What can be told wrong before any variable is known."""
    where = ins.where(path)
    if ins.name == "SHELL" and ins.json is None:
        raise DockerfileError(f"{where}: SHELL requires the JSON form, e.g. SHELL [\"/bin/sh\", \"-c\"]")
    if ins.name == "HEALTHCHECK" and ins.args.split()[0].upper() not in ("NONE", "CMD"):
        raise DockerfileError(f"{where}: HEALTHCHECK takes NONE or CMD ...")
    if ins.name in ("COPY", "ADD") and len(ins.json if ins.json is not None else ins.args.split()) < 2:
        raise DockerfileError(f"{where}: {ins.name} requires at least two arguments: SRC... DEST")
    if ins.name == "ONBUILD":
        inner = ins.args.split()[0].upper()
        if inner in ("ONBUILD", "FROM", "MAINTAINER"):
            raise DockerfileError(f"{where}: ONBUILD {inner} is not allowed")
        try:
            parse(path, "FROM scratch\n" + ins.args + "\n")
        except DockerfileError as e:
            raise DockerfileError(f"{where}: ONBUILD {str(e).split(': ', 1)[-1]}") from None


# -- substitution ----------------------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _lookup(env: dict[str, str], body: str, where: str) -> str:
    m = _NAME.match(body)
    if not m:
        raise DockerfileError(f"{where}: bad substitution ${{{body}}}")
    name, rest = m.group(0), body[m.end():]
    val = env.get(name)
    if not rest:
        return val or ""
    for op in (":-", ":+", "-", "+"):
        if rest.startswith(op):
            word = expand(rest[len(op):], env, where)
            if op == ":-":
                return val if val else word
            if op == ":+":
                return word if val else ""
            if op == "-":
                return val if val is not None else word
            return word if val is not None else ""
    raise DockerfileError(f"{where}: unsupported modifier in ${{{body}}}")


def _process(text: str, env: dict[str, str], where: str, escape: str, split: bool) -> list[str]:
    """Docker's word processing; without `split` one word comes back, quotes kept as written."""
    words: list[str] = []
    cur: list[str] = []
    started = False
    quote = ""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == escape and i + 1 < n and quote != "'":
            nxt = text[i + 1]
            if split or nxt == "$":
                if not split and nxt == "$":
                    cur.append(nxt)
                else:
                    cur.append(nxt)
                started = True
                i += 2
                continue
        if split and c in "'\"" and (not quote or quote == c):
            quote = "" if quote else c
            started = True
            i += 1
            continue
        if not split and c == "'" and quote != '"':
            quote = "" if quote == "'" else "'"
        if not split and c == '"' and quote != "'":
            quote = "" if quote == '"' else '"'
        if c == "$" and quote != "'" and i + 1 < n:
            if text[i + 1] == "{":
                depth, j = 1, i + 2
                while j < n and depth:
                    depth += {"{": 1, "}": -1}.get(text[j], 0)
                    j += 1
                if depth:
                    raise DockerfileError(f"{where}: missing '}}' in {text!r}")
                cur.append(_lookup(env, text[i + 2:j - 1], where))
                started = True
                i = j
                continue
            m = _NAME.match(text, i + 1)
            if m:
                cur.append(env.get(m.group(0), ""))
                started = True
                i = m.end()
                continue
        if split and not quote and c.isspace():
            if started:
                words.append("".join(cur))
            cur, started = [], False
            i += 1
            continue
        cur.append(c)
        started = True
        i += 1
    if split and quote:
        raise DockerfileError(f"{where}: unmatched {quote} in {text!r}")
    if started or not split:
        words.append("".join(cur))
    return words


def expand(text: str, env: dict[str, str], where: str = "Dockerfile", escape: str = "\\") -> str:
    """`text` with its variables substituted (quotes and unknown escapes kept)."""
    return _process(text, env, where, escape, split=False)[0]


def words(text: str, env: dict[str, str], where: str = "Dockerfile", escape: str = "\\") -> list[str]:
    """`text` substituted, split on unquoted blanks, quotes and escapes removed."""
    return _process(text, env, where, escape, split=True)


def key_values(ins: Instruction, env: dict[str, str], path: str, escape: str) -> list[tuple[str, str]]:
    """ENV/LABEL/ARG arguments: `K=V ...`, or the old `K V` form (ENV, LABEL) where the rest is the value."""
    where = ins.where(path)
    first = ins.args.split(None, 1)
    if ins.name != "ARG" and "=" not in first[0]:
        if len(first) < 2:
            raise DockerfileError(f"{where}: {ins.name} {first[0]} needs a value")
        return [(first[0], " ".join(words(first[1], env, where, escape)))]
    out = []
    for w in words(ins.args, env, where, escape):
        k, eq, v = w.partition("=")
        if not k or (not eq and ins.name != "ARG"):
            raise DockerfileError(f"{where}: {ins.name} expects KEY=VALUE, got {w!r}")
        out.append((k, v if eq else None))  # type: ignore[arg-type]
    return out
