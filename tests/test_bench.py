"""tests/bench.py: the study's time split adds up, and the paper preset's projection adds
each stage's work at its rate and prints what it counted. The bench's timings are printed,
never asserted (what they compare is computed alike: the Fisher estimators against brute
force in tests/test_fisher.py)."""
import re

import pytest
import torch

from conftest import run_main


def table_rows(stdout, table=0):
    """The rows of the `table`-th Markdown table (header and rule excluded) as lists of
    cells."""
    tables, previous = [], False
    for line in stdout.splitlines():
        row = line.startswith("| ")
        if row and not previous:
            tables.append([])
        if row and not line.startswith("|---"):
            tables[-1].append([cell.strip() for cell in line.strip("|").split("|")])
        previous = row or line.startswith("|---")
    return tables[table][1:]


def test_study_split_sums_steps_by_stage_and_seed(tmp_path):
    import bench
    (tmp_path / "steps.tsv").write_text(
        "judge\tmetrics\t30\nl2_eps0_seed0\tmetrics\t15\nl2_eps0_seed0\tfisher\t9\n"
        "l2_eps0.5_seed1\tmetrics\t31\nl2_eps0.5_seed1\tinvert\t8\ntotal\tstudy\t61\n")
    wall, stages, seeds = bench.study_split(tmp_path)
    assert wall == 61
    assert stages == {"train": 76, "fisher": 9, "invert": 8}
    assert seeds == {"judge": 30, "0": 24, "1": 39}


def test_projection_adds_each_stage_at_its_rate():
    """flop_rates and paper_projection on a preset of round numbers: 2 robust models and one
    at eps 0 (one seed, the judge robust), 10 epochs of 1000 images at 30% of a 100 TFLOPS
    peak, a Fisher of 10 examples, L-BFGS fits of 1000 iterations of 10 host reads at 20 us,
    4 jobs per GPU."""
    import bench
    paper = dict(grid=[("l2", 0.0), ("l2", 0.5)], seeds=1, judge=("l2", 0.5), epochs=10,
                 steps=7, batch=128, eval_batch=512, train_images=1000, test_images=100,
                 eval_radii=[("l2", 0.5)], eval_steps=10, eval_attack="apgd", eval_restarts=1,
                 fisher_n=10, targets={"t": (1000, 100, 10)}, shots=[1], draws={1: 5},
                 finetune_size=100, finetune_epochs=2, invert_images=2, invert_steps=10,
                 invert_methods=4)
    flops = {"pgd": 20e9, "standard": 3e9, "attack": 2e9, "forward": 1e9, "fisher": 1e12}
    inputs = {"lbfgs_reads": 10, "start": 1.0}
    rates = bench.flop_rates(flops, inputs, {"bf16": 100, "fp32": 50},
                             {"fraction": 0.3, "round_trip": 20e-6, "cuda_start": 2.0})
    rows = bench.paper_projection(paper, rates, jobs=4)

    def seconds(start):  # (low, high) of the stage whose name starts so
        (row,) = [(low, high) for stage, _, low, high in rows if stage.startswith(start)]
        return row

    bf16, fp32 = 0.3 * 100e12, 0.3 * 50e12
    assert seconds("training, 2 robust") == pytest.approx((2 * 10 * 1000 * 20e9 / bf16,) * 2)
    assert seconds("training, 1 models") == pytest.approx((10 * 1000 * 3e9 / bf16,) * 2)
    # 3 models attacked at l2 0.5 (the robust ones' own radius): 3 x 100 images x 10 steps,
    # 1 to 4 runs
    low = 3 * 100 * 10 * 2e9 / fp32
    assert seconds("evaluation") == pytest.approx((low, 4 * low))
    assert seconds("Fisher") == pytest.approx((2 * 10 * 1e12 / fp32,) * 2)
    # 2 measured models: a probe of 5 fits on 1000 features (60000 in the rates: 1/60) and 5
    # one-shot draws of one fit each, 1000 iterations of 10 reads per fit, 1/4
    fit = 1000 * 10 * 20e-6
    assert seconds("transfer: probes") == pytest.approx((2 * (5 * fit / 60 + 5 * fit) / 4,) * 2)
    # 3 trainings, 3 steps of each of the 2 measured models, report.py twice: 3 s each, 1/4
    assert seconds("process start-ups") == pytest.approx(((3 + 6 + 2) * 3.0 / 4,) * 2)
    total = sum(high for *_, high in rows)
    assert total == pytest.approx(sum(seconds(stage[:12])[1] for stage, *_ in rows))


@pytest.mark.slow
def test_bench_projection_prints_hours_and_its_inputs():
    """python tests/bench.py --projection-only --quick: the FLOPs counted here (a PGD-7 step of
    the CIFAR ResNet-18 is 7 attack steps and a training step), no host read in the training
    step's loop, and the projected hours on one H200, every stage positive."""
    proc = run_main("tests/bench.py", "--projection-only", "--quick")
    assert proc.returncode == 0, proc.stderr
    inputs = {row[0]: row[1] for row in table_rows(proc.stdout, 0)}
    gflop = {name: float(inputs[f"FLOPs, {name}"].split()[0])
             for name in ("pgd", "standard", "attack")}
    assert gflop["pgd"] == pytest.approx(7 * gflop["attack"] + gflop["standard"], rel=0.01)
    assert inputs["host reads per training step (in the batch loop)"] == "0"
    hours = re.search(r"on one NVIDIA H200 from FLOP counts: ([\d.]+) to ([\d.]+) hours",
                      proc.stdout)
    assert hours and 0 < float(hours.group(1)) <= float(hours.group(2)), proc.stdout
    stages = table_rows(proc.stdout, 1)
    assert len(stages) >= 9 and all(float(row[2].split()[0]) >= 0 for row in stages)


def test_attack_precisions_and_their_table(capsys):
    """bench.py --bf16-attacks on CUDA adds TF32 (flags on inside, full float32 again after:
    the scripts' setting); the table has a column and a verdict per lower precision, the
    verdict 'missed' above 0.5 points weaker."""
    import bench
    assert set(bench.attack_precisions(torch.device("cpu"))) == {"float32", "bf16"}
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    with bench.attack_precisions(torch.device("cuda"))["tf32"]():
        assert all(f.allow_tf32 for f in flags)
    assert not any(f.allow_tf32 for f in flags)
    bench.print_bf16_attacks([("l2", 0.5, "APGD-20", {"float32": 0.7, "bf16": 0.706,
                                                       "tf32": 0.704})])
    out = capsys.readouterr().out
    assert "| l2 0.5 | APGD-20 | 0.70000 | 0.70600 | 0.70400 | +0.60 | +0.40 |" in out, out
    assert "APGD-20: bf16 weaker than float32 by at most 0.60 points" in out and \
        "missed" in out and "APGD-20: tf32 weaker than float32 by at most 0.40" in out, out
