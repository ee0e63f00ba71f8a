# Sourced by run_all.sh and tests/run.sh: `source setup_python.sh [-r FILE] MODULE...` sets PY
# to a Python that can import every MODULE. FILE (default requirements.txt; a path relative to
# this folder) is the requirements file installed when a .venv is made or topped up.
#
#   - $PYTHON (default python3) is used as it is when it imports them (an active virtual
#     environment included: it is never modified; one that lacks them is an error whose one
#     line says how to install FILE into it).
#   - Else a project-local virtual environment ($VENV, default .venv beside this file) is
#     created with the standard library's venv and FILE (plus matplotlib, for the report's
#     plots) installed into it, once; a .venv that lacks a MODULE (made for another FILE) gets
#     FILE installed into it; later runs find it and install nothing.
# It never runs apt-get or sudo. A failed install stops with one line saying how to install by hand.
# `source setup_python.sh --define` only defines `python_has PYTHON MODULE...` (tests/run.sh).

# Whether PYTHON finds every MODULE, asked of its import system without importing them:
# importing torch and torchvision takes seconds, which every task of a study would pay again.
python_has() {
  "$1" -c 'import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, sys.argv[1:])))' \
    "${@:2}" > /dev/null 2>&1
}
[[ "${1:-}" != --define ]] || return 0
_setup_root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_setup_modules=("$@")
_setup_file=requirements.txt
if [[ "${_setup_modules[0]:-}" == "-r" ]]; then
  _setup_file=${_setup_modules[1]}
  _setup_modules=("${_setup_modules[@]:2}")
fi
_setup_req=$_setup_root/$_setup_file
_setup_list=$(IFS=,; echo "${_setup_modules[*]}")
_setup_imports() { python_has "$1" "${_setup_modules[@]}"; }
_setup_python=${PYTHON:-python3}
_setup_venv=${VENV:-$_setup_root/.venv}
if _setup_imports "$_setup_python"; then
  PY=$_setup_python
elif [[ -n "${VIRTUAL_ENV:-}" && -z "${PYTHON:-}" ]]; then
  echo "error: the active virtual environment $VIRTUAL_ENV lacks one of $_setup_list;" \
       "install them with: python -m pip install -r $_setup_req" >&2
  exit 1
elif [[ -x "$_setup_venv/bin/python" ]] && _setup_imports "$_setup_venv/bin/python"; then
  PY=$_setup_venv/bin/python
elif [[ -x "$_setup_venv/bin/python" ]]; then  # made with another requirements file: top it up
  echo "setup: $_setup_venv cannot import $_setup_list; installing $_setup_file into it (once)"
  if ! "$_setup_venv/bin/python" -m pip install -q -r "$_setup_req"; then
    echo "error: could not install $_setup_file into $_setup_venv; install by hand:" \
         "$_setup_venv/bin/python -m pip install -r $_setup_req" >&2
    exit 1
  fi
  PY=$_setup_venv/bin/python
else
  if ! command -v "$_setup_python" > /dev/null 2>&1; then
    echo "error: no Python found ($_setup_python);" \
         "install Python 3 or set PYTHON=/path/to/python" >&2
    exit 1
  fi
  echo "setup: $_setup_python cannot import $_setup_list;" \
       "installing $_setup_file into $_setup_venv (once)"
  if ! { "$_setup_python" -m venv "$_setup_venv" &&
         "$_setup_venv/bin/python" -m pip install -q -r "$_setup_req"; }; then
    echo "error: could not create $_setup_venv with $_setup_file; install by hand:" \
         "$_setup_python -m pip install -r $_setup_req" >&2
    exit 1
  fi
  "$_setup_venv/bin/python" -m pip install -q matplotlib > /dev/null 2>&1 ||
    echo "setup: matplotlib not installed: the report will have no plots"
  PY=$_setup_venv/bin/python
fi
unset -f _setup_imports
unset _setup_root _setup_modules _setup_python _setup_venv _setup_list _setup_file _setup_req
