"""`lamina build`: Dockerfiles (dockerfile.py), COPY/ADD sources and layers (sources.py), the step executor and its
cache (builder.py), and the commands (cli.py)."""
