#!/usr/bin/env bash
# The test suite in one command, on any machine with Python 3: sets up a Python with the
# requirements and the outside references the tests compare against (requirements-dev.txt),
# then runs pytest on tests/, passing on every argument:
#
#   bash tests/run.sh                 # all tests
#   bash tests/run.sh -m "not slow"   # the fast loop: every test but the end-to-end ones
#   bash tests/run.sh -k fisher       # a selection
#
# With pytest-xdist (requirements-dev.txt) the test files are spread over one worker per core
# (each test runs one torch thread); WORKERS=1 runs them in one process.
#
# The Python: $PYTHON or the active virtual environment's, used as it is when it has torch,
# torchvision, numpy and pytest (a reference it lacks: one line says how to install them,
# and their tests are skipped, or fail under CI=true); else the project's .venv, made or
# topped up with requirements-dev.txt by setup_python.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=(torch torchvision numpy pytest)
references=(sklearn scipy torchattacks skimage)  # the import names of requirements-dev.txt's
source setup_python.sh --define  # python_has
chosen=${PYTHON:-${VIRTUAL_ENV:+python3}}
if [[ -n "$chosen" ]] && python_has "$chosen" "${runtime[@]}"; then
  PY=$chosen
  if ! python_has "$PY" "${references[@]}"; then
    echo "note: $PY lacks an outside reference (${references[*]}); their tests are skipped;" \
         "install them with: $PY -m pip install -r requirements-dev.txt"
  fi
else
  source setup_python.sh -r requirements-dev.txt "${runtime[@]}" "${references[@]}" xdist
fi
workers=${WORKERS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2> /dev/null || echo 1)}
if [[ ! "$workers" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: WORKERS must be a positive integer, got '$workers'" >&2
  exit 2
fi
parallel=()
if (( workers > 1 )) && python_has "$PY" xdist; then
  parallel=(-n "$workers" --dist loadfile)  # whole files, in tests/conftest.py's order
fi
exec "$PY" -m pytest -q "${parallel[@]}" tests "$@"
