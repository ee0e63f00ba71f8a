#!/usr/bin/env bash
# The test suite in one command, on any machine with Python 3: sets up the Python that has
# the requirements (setup_python.sh: $PYTHON if it has them, else a project-local .venv) and
# runs pytest on tests/, passing on every argument:
#
#   bash tests/run.sh            # all tests, a few minutes on two CPU cores
#   bash tests/run.sh -k fisher  # a selection
set -euo pipefail
cd "$(dirname "$0")/.."
source setup_python.sh torch torchvision numpy pytest
exec "$PY" -m pytest -q tests "$@"
