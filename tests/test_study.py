"""report.py verdicts on hand-made results, run_all.sh skip/force/failure logic, paper smoke."""
import json
import os
import subprocess
import textwrap

import pytest

import report
from conftest import ROOT, assert_user_error, run_script


def write_run(folder, eps, seed, clean, pgd, weights_trace, transfer):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(
        {"clean_acc": clean, "adv_acc": {"1": pgd}, "eps": eps, "norm": "l2", "seed": seed}))
    (folder / "fisher.json").write_text(json.dumps({"weights_trace": weights_trace, "weights_trace_se": 0.1}))
    (folder / "transfer.json").write_text(json.dumps({"fashion-mnist:5-9": {"acc": transfer}}))


@pytest.fixture
def results(tmp_path):
    """C1 true by construction (clean falls, PGD rises); C3 false (tr F_w rises with eps);
    C2 false: eps 0 transfers best."""
    for seed, jitter in ((0, 0.0), (1, 0.004), (2, -0.004)):
        for eps, clean, pgd, trace, transfer in ((0, 0.95, 0.05, 10.0, 0.90), (0.5, 0.90, 0.50, 12.0, 0.85),
                                                  (1.0, 0.85, 0.60, 15.0, 0.80)):
            write_run(tmp_path / f"l2_eps{eps}_seed{seed}", eps, seed, clean + jitter, pgd + jitter,
                      trace + 10 * jitter, transfer + jitter)
    return tmp_path


def test_report_verdicts_follow_the_numbers(results):
    report.main(report.get_args([str(results)]))
    summary = json.loads((results / "summary.json").read_text())
    assert len(summary["rows"]) == 9
    claims = summary["claims"]
    assert claims["C1"]["holds"] is True
    assert claims["C2"]["holds"] is False
    assert claims["C3"]["holds"] is False
    assert claims["C4"]["holds"] is None  # no input Fisher in these results
    text = (results / "report.md").read_text()
    assert "C1 holds" in text and "C3 does not hold" in text


def test_report_needs_differences_beyond_noise(tmp_path):
    """Clean accuracy that 'falls' by less than its noise is not a supported claim."""
    for seed, noise in ((0, 0.03), (1, -0.03), (2, 0.0)):
        for eps, clean in ((0, 0.90), (0.5, 0.895), (1.0, 0.89)):
            write_run(tmp_path / f"e{eps}_s{seed}", eps, seed, clean + noise, 0.5, 1.0, 0.5)
    claims = report.judge_claims(report.collect_rows(tmp_path))
    assert claims["C1"]["holds"] is False


def test_statistics_against_hand_values():
    assert report.mean_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, (1 / 3) ** 0.5))
    assert report.spearman([0, 1, 2, 3], [5, 3, 2, 1]) == pytest.approx(-1.0)
    assert report.spearman([0, 1, 2], [1, 3, 2]) == pytest.approx(0.5)


def test_report_errors(tmp_path):
    assert "not found" in assert_user_error(run_script("report.py", tmp_path / "absent"))
    assert "no run" in assert_user_error(run_script("report.py", tmp_path))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{truncated")
    assert "not valid JSON" in assert_user_error(run_script("report.py", tmp_path))
    (tmp_path / "bad" / "metrics.json").write_text('{"eps": 0.5}')
    assert "lacks norm, clean_acc, adv_acc" in assert_user_error(run_script("report.py", tmp_path))


FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stand-in interpreter: records the call and writes the output the real script would.
    echo "$1" >> "$CALLS"
    script=$1; shift
    out=""
    while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
    [ "$script" = report.py ] && out=$(cat "$CALLS.out")
    [ "$script" = "$FAIL" ] && { echo "boom from $script" >&2; exit 3; }
    case $script in
      advtrain.py) echo "$(dirname "$out")" > "$CALLS.out"; echo {} > "$out/metrics.json" ;;
      fisher.py) echo {} > "$out/fisher.json" ;;
      transfer.py) echo {} > "$out/transfer.json" ;;
      invert.py) echo {} > "$out/invert.json" ;;
      report.py) echo ok > "$out/report.md" ;;
    esac
""")


def run_all(tmp_path, fail="", force="0"):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    env = dict(os.environ, PYTHON=str(fake), CALLS=str(calls), FAIL=fail, FORCE=force,
               OUT=str(tmp_path / "res"), SEEDS="0 1")
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], cwd=ROOT, env=env, capture_output=True, text=True)
    return proc, calls.read_text().split()


def test_run_all_skips_done_steps_and_forces(tmp_path):
    proc, calls = run_all(tmp_path)
    assert proc.returncode == 0, proc.stderr
    # judge + 2 seeds x 5 eps x (train, fisher, transfer, invert) + report
    assert calls.count("advtrain.py") == 11 and calls.count("invert.py") == 10 and calls[-1] == "report.py"
    assert (tmp_path / "res" / "l2_eps0.25_seed1" / "transfer.json").exists()
    proc, calls = run_all(tmp_path)
    assert proc.returncode == 0 and calls == ["report.py"]
    assert proc.stdout.count("] skip ") == 41
    proc, calls = run_all(tmp_path, force="1")
    assert len(calls) == 42


def test_run_all_stops_at_a_failing_step(tmp_path):
    proc, calls = run_all(tmp_path, fail="fisher.py")
    assert proc.returncode != 0
    assert "boom from fisher.py" in proc.stderr and "FAILED" in proc.stderr
    assert calls == ["advtrain.py", "advtrain.py", "fisher.py"]
    assert not (tmp_path / "res" / "report.md").exists()


def test_paper_preset_smoke(tmp_path):
    """The paper code path (resnet18, L2 and Linf, several targets) on tiny synthetic data."""
    env = dict(os.environ, OUT=str(tmp_path / "paper"))
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh"), "paper", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "paper" / "summary.json").read_text())
    runs = {r["run"]: r for r in summary["rows"]}
    assert {"judge", "l2_eps0_seed0", "l2_eps0.5_seed0", "linf_eps8_255_seed0"} <= set(runs)
    linf = runs["linf_eps8_255_seed0"]
    assert linf["norm"] == "linf" and linf["eps"] == pytest.approx(8 / 255)
    assert "transfer:synthetic:0-4" in linf and "transfer:fashion-mnist:5-9" in linf
    assert set(summary["claims"]) == {"C1", "C2", "C3", "C4", "C5"}
