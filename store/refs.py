"""Image references: docker's NAME[:TAG] grammar and its normalisation."""
from __future__ import annotations

import re

from .errors import BadInput

# distribution/reference's grammar: a domain is dot-separated components of letters, digits and inner hyphens
# (so `..` or `-x` is none), with an optional port; path components are lower-case words joined by separators.
_DOMAIN = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def normalize_ref(ref: str) -> str:
    """docker's rule: NAME[:TAG], with ':latest' when no tag is given, in familiar form (no docker.io/library/).
    Refuses malformed references."""
    name, tag = ref, "latest"
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = ref.rsplit(":", 1)
    if not _NAME_RE.match(name) or not _TAG_RE.match(tag):
        raise BadInput(f"invalid reference format: {ref!r}")
    # docker's familiar form: docker.io/library/busybox and busybox name the same image, shown as the latter
    for prefix in ("docker.io/", "index.docker.io/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            if name.startswith("library/") and name.count("/") == 1:
                name = name[len("library/"):]
            break
    return f"{name}:{tag}"
