"""setup_python.sh: which Python run_all.sh and tests/run.sh use, and when a .venv is made.
Stub interpreters record their calls, so nothing is installed and no network is needed."""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, assert_user_error

STUB = textwrap.dedent("""\\
    #!/usr/bin/env bash
    # Stand-in Python: imports succeed when its folder holds a file `has-packages`;
    # `-m venv DIR` makes DIR/bin/python (a copy of itself); `-m pip install` "installs".
    here=$(cd "$(dirname "$0")" && pwd)
    echo "$here $*" >> "$CALLS"
    case "$1 $2" in
      "-c "*) [ -f "$here/has-packages" ] ;;
      "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python" ;;
      "-m pip") [ "$PIP_FAILS" != 1 ] && touch "$here/has-packages" ;;
      *) exit 9 ;;
    esac
""")


def stub_python(folder, has_packages):
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    if has_packages:
        (folder / "has-packages").write_text("")
    return stub


def setup(tmp_path, python=None, pip_fails=False, virtual_env=None, path_first=None):
    """Source setup_python.sh as run_all.sh does.

    Returns (exit code, the PY it chose, stdout, stderr, the stub's recorded calls)."""
    calls = tmp_path / "calls"
    calls.write_text("")
    env = dict(os.environ, CALLS=str(calls), VENV=str(tmp_path / "venv"),
               PIP_FAILS="1" if pip_fails else "0")
    env.pop("PYTHON", None)
    env.pop("VIRTUAL_ENV", None)
    if python:
        env["PYTHON"] = str(python)
    if virtual_env:
        env["VIRTUAL_ENV"] = str(virtual_env)
    if path_first:
        env["PATH"] = f"{path_first}:{env['PATH']}"
    script = 'set -euo pipefail; source "$0" torch numpy; echo "PY=$PY"'
    proc = subprocess.run(["bash", "-c", script, str(ROOT / "setup_python.sh")], env=env,
                          capture_output=True, text=True)
    chosen = [line[3:] for line in proc.stdout.splitlines() if line.startswith("PY=")]
    calls = calls.read_text().splitlines()
    return proc.returncode, (chosen or [None])[0], proc.stdout, proc.stderr, calls


def test_python_has_finds_modules_without_importing_them(tmp_path):
    """python_has answers from the import system alone: a module that would record its import
    is found and not imported; one absent module among others makes the answer no."""
    (tmp_path / "recorder.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w')\n")
    script = ('source "$0" --define; python_has "$1" json recorder && echo yes;'
              ' python_has "$1" json absent_module_xyz || echo no')
    proc = subprocess.run(["bash", "-c", script, str(ROOT / "setup_python.sh"), sys.executable],
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)), capture_output=True,
                          text=True)
    assert proc.stdout.split() == ["yes", "no"], proc.stdout + proc.stderr
    assert not (tmp_path / "imported").exists()


def test_python_with_the_packages_is_used_as_it_is(tmp_path):
    stub = stub_python(tmp_path / "sys", has_packages=True)
    code, py, out, err, calls = setup(tmp_path, python=stub)
    assert code == 0 and py == str(stub), err
    assert not (tmp_path / "venv").exists() and all(" -c " in c for c in calls)


def test_python_without_them_gets_a_venv_once(tmp_path):
    stub = stub_python(tmp_path / "sys", has_packages=False)
    code, py, out, err, calls = setup(tmp_path, python=stub)
    venv_python = tmp_path / "venv" / "bin" / "python"
    assert code == 0 and py == str(venv_python), out + err
    assert "installing requirements.txt" in out
    assert any("-m venv" in c for c in calls)
    assert any("-m pip install -q -r" in c and "requirements.txt" in c for c in calls)
    # the second run finds the venv: nothing is created or installed
    code, py, out, err, calls = setup(tmp_path, python=stub)
    assert code == 0 and py == str(venv_python)
    assert not any("-m venv" in c or "-m pip" in c for c in calls) and "installing" not in out


def test_failed_install_is_one_line_naming_the_manual_route(tmp_path):
    stub = stub_python(tmp_path / "sys", has_packages=False)
    code, py, out, err, _ = setup(tmp_path, python=stub, pip_fails=True)
    assert code != 0 and py is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "pip install -r" in lines[0] and "requirements.txt" in lines[0], err


def test_active_virtual_environment_is_never_modified(tmp_path):
    active = tmp_path / "active"
    stub_python(active / "bin", has_packages=False)
    code, py, out, err, calls = setup(tmp_path, virtual_env=active, path_first=active / "bin")
    assert code != 0 and "active virtual environment" in err and len(err.strip().splitlines()) == 1
    assert not any("-m venv" in c or "-m pip" in c for c in calls)
    (active / "bin" / "has-packages").write_text("")
    code, py, out, err, calls = setup(tmp_path, virtual_env=active, path_first=active / "bin")
    assert code == 0 and py == "python3" and not (tmp_path / "venv").exists()


# ----------------------------------------------------------------------------- test requirements

def setup_dev(tmp_path, python):
    """Source setup_python.sh as tests/run.sh does (-r requirements-dev.txt)."""
    calls = tmp_path / "calls"
    calls.write_text("")
    env = dict(os.environ, CALLS=str(calls), VENV=str(tmp_path / "venv"), PIP_FAILS="0",
               PYTHON=str(python))
    env.pop("VIRTUAL_ENV", None)
    script = 'set -euo pipefail; source "$0" -r requirements-dev.txt torch sklearn; echo "PY=$PY"'
    proc = subprocess.run(["bash", "-c", script, str(ROOT / "setup_python.sh")], env=env,
                          capture_output=True, text=True)
    return proc, calls.read_text().splitlines()


def test_requirements_file_given_is_installed_and_tops_up_a_venv_made_without_it(tmp_path):
    stub = stub_python(tmp_path / "sys", has_packages=False)
    proc, calls = setup_dev(tmp_path, stub)
    venv_python = tmp_path / "venv" / "bin" / "python"
    assert proc.returncode == 0 and f"PY={venv_python}" in proc.stdout, proc.stdout + proc.stderr
    assert "installing requirements-dev.txt" in proc.stdout
    assert any("-m pip install -q -r" in c and c.endswith("/requirements-dev.txt") for c in calls)
    # a .venv made by run_all.sh (requirements.txt) lacks the references: topped up, not remade
    (tmp_path / "venv" / "bin" / "has-packages").unlink()
    proc, calls = setup_dev(tmp_path, stub)
    assert proc.returncode == 0 and f"PY={venv_python}" in proc.stdout, proc.stdout + proc.stderr
    assert not any("-m venv" in c for c in calls)
    assert any(c.startswith(str(venv_python.parent)) and c.endswith("/requirements-dev.txt")
               for c in calls), calls


def test_run_sh_uses_a_chosen_python_and_says_how_to_add_the_references(tmp_path):
    """$PYTHON with torch but no references: used as it is, one line says how to install them."""
    stub = tmp_path / "python3"
    stub.write_text('#!/usr/bin/env bash\ncase "$1" in\n  -c) [[ "$*" != *sklearn* ]] ;;\n'
                    '  -m) echo "ran $*" ;;\nesac\n')
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), WORKERS="1")
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(["bash", str(ROOT / "tests" / "run.sh"), "-k", "probe"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    note, ran = proc.stdout.strip().splitlines()
    assert f"{stub} -m pip install -r requirements-dev.txt" in note and "sklearn" in note
    assert ran == "ran -m pytest -q tests -k probe"
    # more workers: the test files spread over them (the stub says it has pytest-xdist)
    proc = subprocess.run(["bash", str(ROOT / "tests" / "run.sh")], capture_output=True,
                          env=dict(env, WORKERS="3"), text=True)
    assert proc.stdout.strip().splitlines()[-1] == "ran -m pytest -q -n 3 --dist loadfile tests"
    proc = subprocess.run(["bash", str(ROOT / "tests" / "run.sh")], capture_output=True,
                          env=dict(env, WORKERS="two"), text=True)
    assert_user_error(proc, "WORKERS must be a positive integer", "'two'")


def test_a_missing_reference_skips_and_fails_under_ci(monkeypatch):
    from conftest import reference
    assert reference("json").loads("[1]") == [1]
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="pip install -r requirements-dev.txt"):
        reference("absent_reference_module")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true.*absent_reference_module"):
        reference("absent_reference_module")


def test_missing_fashion_mnist_stops_the_run_with_one_line_naming_both_remedies(tmp_path):
    """A copy of the project whose data folder is empty, the system copy pointed elsewhere."""
    import shutil
    copy = tmp_path / "project"
    (copy / "tests").mkdir(parents=True)
    for path in [*ROOT.glob("*.py"), ROOT / "tests" / "conftest.py", ROOT / "pytest.ini"]:
        shutil.copy(path, copy / path.relative_to(ROOT))
    (copy / "tests" / "test_any.py").write_text("def test_any():\n    pass\n")
    # a plugin (-p) is imported before conftest: it points data.py's system copy elsewhere
    plugin = f"import data\ndata.SYSTEM_FASHION_MNIST = {str(tmp_path)!r}\n"
    (tmp_path / "no_system_copy.py").write_text(plugin)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{copy}")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no_system_copy",
                           "-p", "no:cacheprovider", "tests"], cwd=copy, env=env,
                          capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 4 and len(lines) == 1, proc.stdout + proc.stderr
    assert "Fashion-MNIST" in lines[0] and "apt-get install dataset-fashion-mnist" in lines[0]
    assert "FashionMNIST('data', download=True)" in lines[0] and "passed" not in proc.stdout
    from conftest import fashion_mnist_missing
    assert fashion_mnist_missing() is None  # here it is present


def test_workers_take_the_longest_files_first():
    """tests/run.sh's workers take whole files in conftest.py's order (LONGEST_FILES first),
    not re-sorted by pytest-xdist by their number of tests: one selected test of
    test_report.py (listed as long) runs before two of test_contract.py (not listed)."""
    from conftest import reference
    reference("xdist")
    selected = ("test_binomial_margin or test_the_readme_lists_the_core_functions"
                " or test_every_listed_function_is_in_the_readme_and_runs_here")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "1",
                           "--dist", "loadfile", "-v", "-k", selected, "tests/test_contract.py",
                           "tests/test_report.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ran = [line.split("PASSED ")[1].split("::")[0] for line in proc.stdout.splitlines()
           if "PASSED " in line]
    assert ran[0] == "tests/test_report.py" and ran.count("tests/test_contract.py") >= 2, ran
