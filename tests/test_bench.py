"""tests/bench.py: its numbers are sane (timings are printed, never asserted), and the study's
time split adds up."""
import math
import re

import pytest

from conftest import run_script


def table_rows(stdout):
    """The Markdown table's rows (header and rule excluded) as lists of cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines
            if not line.startswith("|---")]


@pytest.mark.slow
def test_bench_quick_numbers_are_consistent():
    """The three Fisher implementations print the same mean trace (they compute one quantity);
    every ratio is a positive finite number; the probes beat chance (5 classes)."""
    proc = run_script("tests/bench.py", "--quick")
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    ratios = [float(re.match(r"[\d.]+(e[+-]?\d+)?", r[2]).group()) for r in rows if r[2]]
    assert len(ratios) >= 4 and all(0 < q < math.inf for q in ratios), rows
    traces = [float(m) for r in rows if r[0].startswith("Fisher weights trace")
              for m in re.findall(r"mean trace ([\d.e+-]+)", r[1])]
    assert len(traces) >= 3 and max(traces) == pytest.approx(min(traces), rel=2e-3), traces
    probe = next(r for r in rows if r[0].startswith("linear probe"))
    accuracies = [float(a) for a in re.findall(r"acc ([\d.]+)", probe[1])]
    assert len(accuracies) == 2 and all(0.5 < a <= 1 for a in accuracies), probe


def test_study_split_sums_steps_by_stage_and_seed(tmp_path):
    import bench
    (tmp_path / "steps.tsv").write_text(
        "judge\tmetrics\t30\nl2_eps0_seed0\tmetrics\t15\nl2_eps0_seed0\tfisher\t9\n"
        "l2_eps0.5_seed1\tmetrics\t31\nl2_eps0.5_seed1\tinvert\t8\ntotal\tstudy\t61\n")
    wall, stages, seeds = bench.study_split(tmp_path)
    assert wall == 61
    assert stages == {"train": 76, "fisher": 9, "invert": 8}
    assert seeds == {"judge": 30, "0": 24, "1": 39}
