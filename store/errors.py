"""Errors the store raises. Each carries a one-line message naming the problem, shown to users as is."""
from __future__ import annotations


class StoreError(Exception):
    """Anything the store refuses or cannot do; the CLI prints `lamina: <message>` and exits non-zero."""


class BadInput(StoreError):
    """The input (an archive, a layout, a tar) is malformed, unsafe or does not match its digests."""


class NotFound(StoreError):
    """A named image, tag or layer does not exist."""


class Corrupt(StoreError):
    """The store itself is damaged (a missing or altered object); `lamina fsck` reports the details."""
