"""tests/bench.py --quick keeps working (timings are printed, never asserted)."""
from conftest import run_script


def test_bench_quick_prints_a_table():
    proc = run_script("tests/bench.py", "--quick")
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| stage") and len(table) >= 7, proc.stdout
    assert any("PGD-3 training step, resnet18" in line for line in table)
