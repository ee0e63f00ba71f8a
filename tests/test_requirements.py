"""requirements.txt: every runtime requirement has a lower bound, the installed versions meet
it, and the code uses no numpy name that the numpy floor lacks (checked by reading the code
and by running stats.py with those names refused)."""
import ast
import importlib.metadata
import re
import types

import numpy as np
import pytest

import stats
from conftest import ROOT

# numpy names added after the floor that requirements.txt declares (numpy 2.0: the array API
# names; 2.1, 2.2: later additions). A name here is refused by the floor's API.
NUMPY_NEWER_THAN_FLOOR = {
    "trapezoid", "concat", "permute_dims", "matrix_transpose", "isdtype", "vecdot", "pow",
    "acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "bitwise_left_shift",
    "bitwise_right_shift", "bitwise_invert", "unique_all", "unique_counts", "unique_inverse",
    "unique_values", "cumulative_sum", "cumulative_prod", "unstack", "astype", "matvec", "vecmat",
}
NUMPY_FLOOR = (1, 26)  # the oldest numpy whose API the names above are counted against


def requirements():
    """{name: (operator, version)} of requirements.txt's lines."""
    found = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(==|>=|~=)?\s*([0-9][0-9.]*)?", line)
            assert match, line
            found[match[1].lower()] = (match[2], match[3])
    return found


def version_tuple(text):
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_every_runtime_requirement_has_a_lower_bound_the_installed_version_meets():
    """Without a floor, pip may keep a version the code cannot run on (numpy 1.x once lacked a
    name stats.py used, and report.py failed after the whole study)."""
    reqs = requirements()
    assert {"torch", "torchvision", "numpy"} <= set(reqs)
    for name, (op, version) in reqs.items():
        assert op in ("==", ">=", "~=") and version, f"{name} has no lower bound"
        installed = version_tuple(importlib.metadata.version(name))
        assert installed >= version_tuple(version), (name, installed, version)
    assert version_tuple(reqs["numpy"][1])[:2] == NUMPY_FLOOR


def project_numpy_names():
    """{name: [file, ...]} of every np.<name> attribute the project's modules use."""
    names = {}
    for path in sorted(ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "np"):
                names.setdefault(node.attr, []).append(path.name)
    return names


def test_the_code_uses_only_numpy_names_of_the_floor():
    used = project_numpy_names()
    assert "asarray" in used  # the scan sees the code
    newer = {name: files for name, files in used.items() if name in NUMPY_NEWER_THAN_FLOOR}
    assert not newer, f"numpy names newer than {NUMPY_FLOOR}: {newer}"


def test_stats_runs_with_the_floor_api(monkeypatch):
    """stats.py's numerics with numpy's newer names refused, as on the floor: the power of the
    t-test (an integral) and the tests the report runs."""
    floor = types.SimpleNamespace(**{name: getattr(np, name) for name in dir(np)
                                     if name not in NUMPY_NEWER_THAN_FLOOR})
    reference = stats.mde_t(0.01, 5)
    monkeypatch.setattr(stats, "np", floor)
    assert stats.mde_t(0.01, 5) == reference
    assert 0 < stats.t_power(2.0, 5) < 1
    assert stats.one_sided_t([0.1, 0.2, 0.15, 0.12], +1)["p"] < 0.05
    assert stats.kendall_test([1.0, 2.0, 3.0, 4.0, 5.0], +1)["p"] == pytest.approx(1 / 120)
    assert stats.kendall_mde([0.0, 0.5, 1.0, 2.0], 0.1) > 0
