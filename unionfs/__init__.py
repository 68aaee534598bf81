"""lamina's copy-on-write union filesystem: a pure-Python overlay core with a thin FUSE front end."""
