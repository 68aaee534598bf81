"""`lamina pull`, `lamina push`, `lamina login`, `lamina logout`."""
from __future__ import annotations

import sys

import click

from store.cli import fail, store_command
from store.errors import StoreError
from store.root import Store

from . import credentials
from .reference import DOCKER_HUB, parse


def tls_options(fn):
    fn = click.option("--cert-dir", metavar="DIR",
                      help="CA certificates (*.crt) and client certificates (*.cert, *.key) for the registry "
                           "(default: /etc/containers/certs.d/HOST, /etc/docker/certs.d/HOST).")(fn)
    fn = click.option("--tls-verify", type=bool, default=True, show_default=True,
                      help="Require HTTPS with a trusted certificate (false: any certificate, or plain HTTP).")(fn)
    return click.option("--insecure", is_flag=True, help="Same as --tls-verify=false.")(fn)


def _client(ref_registry: str, api_host: str, tls_verify: bool, insecure: bool, cert_dir: str | None, **kw):
    from .client import Client
    return Client(ref_registry, api_host, tls_verify=tls_verify and not insecure, cert_dir=cert_dir, **kw)


def _is_http_error(e: BaseException) -> bool:
    # httpx is imported by the client only when a registry is reached: every other `lamina` command would pay its
    # ~35 ms of imports when this module is loaded to list the commands. No httpx loaded, no httpx error.
    httpx = sys.modules.get("httpx")
    return httpx is not None and isinstance(e, httpx.HTTPError)


def _http_errors(fn):
    """httpx errors the client did not turn into RegistryError (none expected) still end in one line."""
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:
            if not _is_http_error(e):
                raise
            raise StoreError(f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@click.command("pull")
@click.argument("reference")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Platform to pick from an index (default: this host's).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image reference.")
@tls_options
@store_command
@_http_errors
def pull_cmd(store: Store, reference: str, platform: str | None, quiet: bool, insecure: bool, tls_verify: bool,
             cert_dir: str | None) -> None:
    """Pull an image from a registry (busybox, host:port/repo:tag, repo@sha256:...)."""
    from .progress import UI
    from .pull import Platform, pull
    ref = parse(reference)
    plat = Platform.parse(platform)
    client = _client(ref.registry, ref.api_host, tls_verify, insecure, cert_dir)
    try:
        r = pull(store, client, ref, plat, UI(quiet))
    finally:
        client.close()
    if not quiet:
        click.echo(f"Digest: {r.digest}")
        click.echo(f"Image: {r.image_id} ({r.fetched} layers pulled, {r.present} already present)")
    click.echo(r.reference)


@click.command("push")
@click.argument("image")
@click.argument("destination", required=False)
@click.option("--compression", type=click.Choice(["gzip", "zstd"]), default="gzip", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="Print only the pushed reference.")
@tls_options
@store_command
@_http_errors
def push_cmd(store: Store, image: str, destination: str | None, compression: str, quiet: bool, insecure: bool,
             tls_verify: bool, cert_dir: str | None) -> None:
    """Push IMAGE (NAME[:TAG] or id) to a registry, as DESTINATION (host[:port]/repo[:tag]) or under its name."""
    from store.reader import load_image, resolve_name
    from .progress import UI
    from .push import push
    image_id, tag = resolve_name(store, image)
    if destination is None:
        if tag is None:
            raise StoreError(f"{image}: an image named by id needs a DESTINATION")
        destination = tag
    dest = parse(destination)
    client = _client(dest.registry, dest.api_host, tls_verify, insecure, cert_dir)
    try:
        digest, uploaded = push(store, client, load_image(store, image_id), dest, compression, UI(quiet))
    finally:
        client.close()
    if not quiet:
        click.echo(f"{dest.tag}: digest: {digest} ({uploaded} blobs uploaded)")
    click.echo(f"{dest.name}:{dest.tag}@{digest}")


def _registry_name(server: str | None) -> str:
    host = (server or DOCKER_HUB).split("://", 1)[-1].split("/", 1)[0]
    return DOCKER_HUB if host in ("index.docker.io", "registry-1.docker.io") else host


@click.command("login")
@click.argument("server", required=False)
@click.option("-u", "--username")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@tls_options
def login_cmd(server: str | None, username: str | None, password_stdin: bool, insecure: bool, tls_verify: bool,
              cert_dir: str | None) -> None:
    """Log in to a registry (default Docker Hub); the credentials go to ~/.docker/config.json. There is no
    --password option: a password in the arguments would be visible to every process."""
    registry = _registry_name(server)
    try:
        if username is None:
            username = click.prompt("Username")
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = click.prompt("Password", hide_input=True)
        if not username or not password:
            raise StoreError("username and password are required")
        api = "registry-1.docker.io" if registry == DOCKER_HUB else registry
        client = _client(registry, api, tls_verify, insecure, cert_dir, creds=(username, password))
        try:
            client.request("GET", "/v2/", []).close()
        finally:
            client.close()
        credentials.store(registry, username, password)
    except StoreError as e:
        fail(str(e))
    except Exception as e:
        if not _is_http_error(e):
            raise
        fail(f"{registry}: {e.__class__.__name__}")
    click.echo("Login Succeeded")


@click.command("logout")
@click.argument("server", required=False)
def logout_cmd(server: str | None) -> None:
    """Forget the credentials of a registry (default Docker Hub)."""
    registry = _registry_name(server)
    try:
        removed = credentials.remove(registry)
    except StoreError as e:
        fail(str(e))
    click.echo(f"Removed login credentials for {registry}" if removed else f"Not logged in to {registry}")


COMMANDS = [pull_cmd, push_cmd, login_cmd, logout_cmd]
