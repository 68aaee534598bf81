#!/usr/bin/env bash
# Runs the whole test suite (set-up included). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$LAMINA_TOP"
exec "$LAMINA_TOP/.venv/bin/python" -m pytest "$@"
