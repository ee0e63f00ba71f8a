"""run_all.sh imagenet: the manifest of published checkpoints (errors before any work, cells,
judge, --unsafe-load, transfer targets), the smoke end to end on fake checkpoints and images,
and advtrain.py --eval-only on a torchvision state dict with --dataset imagenet."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision

import advtrain
import common
from conftest import ROOT, assert_user_error, run_script
from make_fake_imagenet import write_folder

FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stand-in interpreter: records each call and writes the output the real script would.
    [ "$1" = -c ] && exit 0  # setup_python.sh asks whether it imports torch: it does
    echo "$*" >> "$CALLS"
    out=""; prev=""
    for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
    case $1 in
      advtrain.py) echo {} > "$out/metrics.json" ;;
      fisher.py) echo {} > "$out/fisher.json" ;;
      transfer.py) echo {} > "$out/transfer.json" ;;
      invert.py) echo {} > "$out/invert.json" ;;
      report.py) echo ok > "$2/report.md" ;;
    esac
""")
# The variables of the preset: none may leak in from the environment of the test run.
PRESET_ENV = ("CKPT_DIR", "DATA_DIR", "TARGETS_LIST", "UNSAFE_LOAD", "OUT", "SEEDS", "FORCE", "JOBS")


def preset_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in PRESET_ENV}
    return dict(env, OUT=str(tmp_path / "res"), **extra)


def fake_run(tmp_path, manifest, files=(), data=("val",), **env):
    """run_all.sh imagenet with the fake interpreter, CKPT_DIR=tmp/ckpt holding `files` and
    manifest.csv (None: no manifest), DATA_DIR=tmp/data holding the folders `data`.
    Returns (process, the calls, one per line)."""
    ckpt, data_dir = tmp_path / "ckpt", tmp_path / "data"
    for name in files:
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / name).write_bytes(b"weights")
    ckpt.mkdir(exist_ok=True)
    if manifest is not None:
        (ckpt / "manifest.csv").write_text(manifest)
    for folder in data:
        (data_dir / folder).mkdir(parents=True, exist_ok=True)
    fake, calls = tmp_path / "fake_python", tmp_path / "calls"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls.write_text("")
    env = preset_env(tmp_path, **{"PYTHON": str(fake), "CALLS": str(calls), "CKPT_DIR": str(ckpt),
                                  "DATA_DIR": str(data_dir), "JOBS": "1", **env})
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh"), "imagenet"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, calls.read_text().splitlines()


HEADER = "file,norm,eps,seed\n"


@pytest.mark.parametrize("manifest,files,expect", [
    (HEADER + "a.pt,l2,0\nb.pt,l2,0.5\n", ["a.pt"], "line 3: checkpoint not found"),
    (HEADER + "a.pt,l2\n", ["a.pt"], "line 2: expected file,norm,eps[,seed]"),
    (HEADER + "a.pt,l2,0,0,extra\n", ["a.pt"], "expected file,norm,eps[,seed]"),
    (HEADER + "a.pt,l1,0.5\n", ["a.pt"], "unknown norm 'l1' (l2 or linf)"),
    (HEADER + "a.pt,linf,half\n", ["a.pt"], "eps 'half' is not a number"),
    (HEADER + "a.pt,linf,4/0\n", ["a.pt"], "eps '4/0' is not a number"),
    (HEADER + "a.pt,l2,0.5,first\n", ["a.pt"], "seed 'first'"),
    (HEADER + "a.pt,l2,0.5\nb.pt,l2,0.5,0\n", ["a.pt", "b.pt"], "a second checkpoint for cell l2_eps0.5_seed0"),
    ("a.pt,l2,0.5\n", ["a.pt"], "the first line must be the header"),
    (HEADER + "\n", [], "lists no checkpoint"),
    (None, [], "manifest not found"),
], ids=["missing-file", "missing-column", "extra-column", "unknown-norm", "bad-eps", "zero-denominator", "bad-seed",
        "duplicate-cell", "no-header", "no-rows", "no-manifest"])
def test_a_bad_manifest_is_one_line_before_any_work(tmp_path, manifest, files, expect):
    proc, calls = fake_run(tmp_path, manifest, files)
    line = assert_user_error(proc)
    assert line.startswith("error: ") and expect in line, line
    assert calls == [] and not (tmp_path / "res").exists()


def test_missing_ckpt_dir_data_and_targets_are_one_line(tmp_path):
    manifest = HEADER + "a.pt,l2,0\n"
    proc, _ = fake_run(tmp_path, manifest, ["a.pt"], CKPT_DIR=str(tmp_path / "absent"))
    assert "CKPT_DIR not found" in assert_user_error(proc)
    proc, _ = fake_run(tmp_path, manifest, ["a.pt"], CKPT_DIR="")
    assert "needs CKPT_DIR" in assert_user_error(proc)
    proc, calls = fake_run(tmp_path, manifest, ["a.pt"], DATA_DIR=str(tmp_path / "nodata"))
    assert "DATA_DIR/val" in assert_user_error(proc) and calls == []
    assert not (tmp_path / "res").exists()


def test_manifest_rows_become_cells_evaluated_never_trained(tmp_path):
    """Every row is a cell named like the trained presets', evaluated by advtrain.py --eval-only
    with the row's norm, eps and seed (default 0); Fisher, transfer and inversion read the file
    in CKPT_DIR, which stays untouched; the judge is the largest L2 eps; UNSAFE_LOAD=1 reaches
    every script; the transfer targets are those found in DATA_DIR, or TARGETS_LIST."""
    manifest = HEADER + "std.pth,l2,0\nrobust3.ckpt,l2,3,0\r\nrobust1.ckpt, l2 ,1\nsub/linf.ckpt,linf,4/255,1"
    files = ["std.pth", "robust3.ckpt", "robust1.ckpt", "sub/linf.ckpt"]
    proc, calls = fake_run(tmp_path, manifest, files, data=("val", "cifar-10-batches-py"), UNSAFE_LOAD="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ckpt = tmp_path / "ckpt"
    cells = {"l2_eps0_seed0": ("std.pth", "l2 --eps 0 --seed 0"),
             "l2_eps3_seed0": ("robust3.ckpt", "l2 --eps 3 --seed 0"),
             "l2_eps1_seed0": ("robust1.ckpt", "l2 --eps 1 --seed 0"),
             "linf_eps4_255_seed1": ("sub/linf.ckpt", "linf --eps 4/255 --seed 1")}
    by_script = {s: [c for c in calls if c.startswith(s)] for s in ("advtrain.py", "fisher.py", "transfer.py",
                                                                    "invert.py", "report.py")}
    assert {s: len(c) for s, c in by_script.items()} == {"advtrain.py": 4, "fisher.py": 4, "transfer.py": 4,
                                                         "invert.py": 4, "report.py": 1}
    for cell, (file, training) in cells.items():
        out = f"--out {tmp_path / 'res' / cell}"
        ev = [c for c in by_script["advtrain.py"] if c.endswith(out)]
        assert len(ev) == 1 and f"--eval-only --ckpt {ckpt / file} --dataset imagenet" in ev[0], ev
        assert f"--norm {training}" in ev[0] and "--resume" not in ev[0]
        for script in ("fisher.py", "transfer.py", "invert.py"):
            assert any(c.startswith(f"{script} --ckpt {ckpt / file} ") and c.endswith(out) for c in calls), script
    assert all("--unsafe-load" in c for c in calls if not c.startswith("report.py"))
    assert all(f"--judge {ckpt / 'robust3.ckpt'} " in c for c in by_script["invert.py"])
    assert all("--target cifar10 " in c and "--target cifar100" not in c for c in by_script["transfer.py"])
    assert sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()) == sorted(
        files + ["manifest.csv"])
    assert "4 cells from" in proc.stdout and "robust3.ckpt" in proc.stdout

    proc, calls = fake_run(tmp_path, manifest, files, data=("val", "cifar-10-batches-py"), UNSAFE_LOAD="1")
    assert proc.returncode == 0 and calls == [f"report.py {tmp_path / 'res'}"]
    assert proc.stdout.count(": skip ") == 16
    # other targets and no unpickling: transfer is redone with them, the rest for the flag
    proc, calls = fake_run(tmp_path, manifest, files, TARGETS_LIST="svhn mnist")
    assert proc.returncode == 0 and not any("--unsafe-load" in c for c in calls)
    assert all("--target svhn --target mnist --shots" in c for c in calls if c.startswith("transfer.py"))


def test_without_an_l2_checkpoint_inversion_has_no_judge(tmp_path):
    proc, calls = fake_run(tmp_path, HEADER + "a.pt,linf,4/255\n", ["a.pt"], TARGETS_LIST="cifar10")
    assert proc.returncode == 0, proc.stderr
    assert [c for c in calls if c.startswith("invert.py") and "--judge" not in c]


def test_smoke_end_to_end(tmp_path):
    """The imagenet preset's whole code path on fake checkpoints (a robustness file and a
    torchvision state dict, 10 classes) and a 40-image folder: one seed per eps, so every claim
    is undetermined (report.py needs 3 seeds). Bounded: a few minutes at most."""
    out = tmp_path / "res"
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh"), "imagenet", "--smoke"], cwd=ROOT,
                          env=preset_env(tmp_path, PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = {"l2_eps0_seed0": ("l2", 0.0), "linf_eps4_255_seed0": ("linf", 4 / 255)}
    assert {p.parent.name for p in out.glob("*/metrics.json")} == set(expected)
    for cell, (norm, eps) in expected.items():
        for name in ("metrics.json", "fisher.json", "transfer.json", "invert.json"):
            assert (out / cell / name).is_file(), (cell, name)
        metrics = json.loads((out / cell / "metrics.json").read_text())
        assert (metrics["norm"], metrics["seed"], metrics["dataset"], metrics["test_size"]) == (norm, 0, "imagenet", 8)
        assert metrics["eps"] == pytest.approx(eps)
        radii = {(r["norm"], round(r["eps"], 6)) for r in metrics["robust_acc"]}
        assert {("l2", 0.5), ("linf", round(8 / 255, 6))} <= radii, cell
        assert "synthetic:0-4" in json.loads((out / cell / "transfer.json").read_text())
        assert json.loads((out / cell / "invert.json").read_text())["baseline"]["judge_acc"] is not None
    assert (out / "report.md").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert {cid: c["verdict"] for cid, c in summary["claims"].items()} == {
        f"C{i}": "undetermined" for i in range(1, 7)}
    assert sorted(p.name for p in (out / "fake" / "ckpt").iterdir()) == sorted(
        ["manifest.csv", "resnet18_l2_eps0.pth", "resnet18_linf_eps4.ckpt"])


@pytest.fixture(scope="module")
def torchvision_ckpt(tmp_path_factory):
    """A plain torchvision ResNet-18 state dict (10 classes) and a 10-class folder of 10 images."""
    root = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), root / "r18.pth")
    write_folder(root / "data", per_class=1)
    return root


def test_eval_only_a_torchvision_state_dict_on_an_imagenet_folder(torchvision_ckpt, tmp_path):
    root = torchvision_ckpt
    argv = ["advtrain.py", "--eval-only", "--ckpt", root / "r18.pth", "--dataset", "imagenet", "--data-dir",
            root / "data", "--norm", "linf", "--eps", "4/255", "--seed", "3", "--eval-eps", "l2:0.5",
            "--eval-steps", "1", "--device", "cpu"]
    proc = run_script(*argv, "--test-size", "4", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["norm"], metrics["seed"], metrics["dataset"], metrics["arch"], metrics["test_size"]) == (
        "linf", 3, "imagenet", "resnet18", 4)
    assert metrics["eps"] == pytest.approx(4 / 255)
    assert [(r["norm"], round(r["eps"], 6)) for r in metrics["robust_acc"]] == [("l2", 0.5), ("linf", round(4 / 255, 6))]
    assert "asked for 11 test examples" in assert_user_error(run_script(*argv, "--test-size", "11", "--out", tmp_path))
    assert "needs --norm" in assert_user_error(run_script(*argv[:8], "--eps", "1", "--out", tmp_path))


def test_eval_only_keeps_our_checkpoints_training_and_imagenet_is_not_for_training(tiny_ckpt, tmp_path):
    """Our checkpoints record norm, eps and seed: a contradicting value is an error (the
    metrics would be filed under a radius the model never had); agreeing values are fine."""
    for flag, value in (("--eps", "1.0"), ("--norm", "linf"), ("--seed", "7"), ("--dataset", "mnist")):
        with pytest.raises(common.UserError, match=f"{flag} .* contradicts"):
            advtrain.main(advtrain.get_args(["--eval-only", "--ckpt", str(tiny_ckpt), flag, value,
                                             "--out", str(tmp_path)]))
    advtrain.main(advtrain.get_args(["--eval-only", "--ckpt", str(tiny_ckpt), "--eps", "0.5", "--norm", "l2",
                                     "--seed", "0", "--test-size", "16", "--eval-steps", "1", "--out", str(tmp_path)]))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["norm"], metrics["eps"], metrics["seed"], metrics["dataset"]) == ("l2", 0.5, 0, "fashion-mnist")
    line = assert_user_error(run_script("advtrain.py", "--dataset", "imagenet", "--epochs", "1"))
    assert "invalid choice for training" in line and "--eval-only" in line
