"""tests/bench.py --quick keeps working (timings are printed, never asserted)."""
from conftest import run_script


def test_bench_quick_prints_a_table():
    proc = run_script("tests/bench.py", "--quick")
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| stage") and len(table) >= 7, proc.stdout
    assert any("PGD-3 training step, resnet18" in line for line in table)


def test_study_split_sums_steps_by_stage_and_seed(tmp_path):
    import bench
    (tmp_path / "steps.tsv").write_text("judge\tmetrics\t30\nl2_eps0_seed0\tmetrics\t15\nl2_eps0_seed0\tfisher\t9\n"
                                        "l2_eps0.5_seed1\tmetrics\t31\nl2_eps0.5_seed1\tinvert\t8\ntotal\tstudy\t61\n")
    wall, stages, seeds = bench.study_split(tmp_path)
    assert wall == 61
    assert stages == {"train": 76, "fisher": 9, "invert": 8}
    assert seeds == {"judge": 30, "0": 24, "1": 39}
