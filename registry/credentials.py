"""Registry credentials in Docker's config file (`$DOCKER_CONFIG/config.json`, else ~/.docker/config.json), key
`auths`, as docker, podman and skopeo read it: {"auths": {"host[:port]": {"auth": base64("user:password")}}}.
Docker Hub's key is "https://index.docker.io/v1/". The file is rewritten atomically with mode 0600, keeping every
other key. Secrets never leave this module except as request headers."""
from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

from store.errors import StoreError

from .reference import DOCKER_HUB

HUB_KEY = "https://index.docker.io/v1/"


def config_path() -> Path:
    d = os.environ.get("DOCKER_CONFIG")
    return Path(d) / "config.json" if d else Path.home() / ".docker" / "config.json"


def _key_host(key: str) -> str:
    """"https://index.docker.io/v1/" -> "docker.io", "http://h:5000" -> "h:5000" (docker's normalisation)."""
    host = key.split("://", 1)[-1].split("/", 1)[0]
    return DOCKER_HUB if host in ("index.docker.io", "registry-1.docker.io", DOCKER_HUB) else host


def _read() -> dict:
    p = config_path()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise StoreError(f"{p}: unreadable ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{p}: not a JSON object")
    return data


def lookup(registry: str) -> tuple[str, str] | None:
    """(username, password) for a registry ("docker.io", "127.0.0.1:5000"), or None."""
    auths = _read().get("auths") or {}
    for key, entry in auths.items():
        if _key_host(key) != registry or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except ValueError:
                raise StoreError(f"{config_path()}: bad auth entry for {registry}") from None
            return user, password
        if entry.get("username"):
            return entry["username"], entry.get("password", "")
    return None


def _write(data: dict) -> None:
    p = config_path()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".config.json.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent="\t")
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        os.unlink(tmp)
        raise


def store(registry: str, username: str, password: str) -> None:
    data = _read()
    auths = data.setdefault("auths", {})
    for key in [k for k in auths if _key_host(k) == registry]:
        del auths[key]
    key = HUB_KEY if registry == DOCKER_HUB else registry
    auths[key] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
    _write(data)


def remove(registry: str) -> bool:
    """Forgets a registry's credentials; False when there were none."""
    data = _read()
    auths = data.get("auths") or {}
    keys = [k for k in auths if _key_host(k) == registry]
    for k in keys:
        del auths[k]
    if keys:
        _write(data)
    return bool(keys)
