"""Pushing and pulling images to and from OCI registries (the OCI distribution API).

Owns references (Docker's grammar), transport (TLS, retries, authentication), credentials in
~/.docker/config.json, and the pull and push protocols. Dependencies: registry -> store; the store knows nothing of
registries, and a pull stores its layers through the store's all-or-nothing import (store/streamimport.py).
"""
