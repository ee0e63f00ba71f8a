"""run_all.sh imagenet: the manifest of published checkpoints (errors before any work, cells,
judge, --unsafe-load, transfer targets), data.py's answer to which datasets are present, the
smoke end to end on fake checkpoints and images, and advtrain.py --eval-only on a torchvision
state dict with --dataset imagenet."""
import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torchvision

import advtrain
import common
import data
from conftest import ROOT, assert_user_error, run_main
from make_fake_imagenet import write_folder

FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stand-in interpreter: records each call and writes the output the real script would.
    [ "$1" = -c ] && exit 0  # setup_python.sh asks whether it imports torch: it does
    if [ "$1" = data.py ]; then  # `data.py present NAME... --data-dir D`: those of NAME that
      shift 2; dir="" names=()   # are in PRESENT, when D is DATA_DIR (data.py's answer, asked
      while [ $# -gt 0 ]; do     # by the test: see fake_run)
        case $1 in --data-dir) dir=$2; shift 2 ;; *) names+=("$1"); shift ;; esac
      done
      [ "$dir" = "$DATA_DIR" ] || exit 0
      for name in "${names[@]}"; do [[ " $PRESENT " != *" $name "* ]] || echo "$name"; done
      exit 0
    fi
    echo "$*" >> "$CALLS"
    out=""; prev=""
    for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
    case $1 in
      advtrain.py) echo {} > "$out/metrics.json" ;;
      fisher.py) echo {} > "$out/fisher.json" ;;
      transfer.py) echo {} > "$out/transfer.json" ;;
      invert.py) echo {} > "$out/invert.json" ;;
      report.py) [ "$2" = --declare ] || echo ok > "$2/report.md" ;;
    esac
""")
# The variables of the preset: none may leak in from the environment of the test run.
PRESET_ENV = ("CKPT_DIR", "DATA_DIR", "TARGETS_LIST", "UNSAFE_LOAD", "OUT", "SEEDS", "FORCE",
              "JOBS")


def preset_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in PRESET_ENV}
    return dict(env, OUT=str(tmp_path / "res"), **extra)


# The files of each dataset in DATA_DIR, in the layouts torchvision's loaders (and data.py's
# IDX reader) expect: the file names of the datasets' own distributions.
LAYOUTS = {
    "mnist": [f"MNIST/raw/{split}-{kind}-ubyte" for split in ("train", "t10k")
              for kind in ("images-idx3", "labels-idx1")],
    "fashion-mnist": [f"fashion-mnist/{split}-{kind}-ubyte.gz" for split in ("train", "t10k")
                      for kind in ("images-idx3", "labels-idx1")],
    "cifar10": [f"cifar-10-batches-py/{name}" for name in (
        "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
        "test_batch", "batches.meta")],
    "cifar100": ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"],
    "svhn": ["train_32x32.mat", "test_32x32.mat"],
}


def lay_out(data_dir, name, skip=None):
    """Empty files in the layout of dataset `name` under data_dir, but for the file `skip`."""
    for rel in LAYOUTS[name]:
        if rel != skip:
            (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (data_dir / rel).write_bytes(b"")


def fake_run(tmp_path, manifest, files=(), folders=("val",), targets=(), **env):
    """run_all.sh imagenet with the fake interpreter, CKPT_DIR=tmp/ckpt holding `files` and
    manifest.csv (None: no manifest), DATA_DIR=tmp/data holding the `folders` and the
    datasets `targets` in their layouts. Returns (process, the calls, one per line)."""
    ckpt, data_dir = tmp_path / "ckpt", tmp_path / "data"
    for name in files:
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / name).write_bytes(b"weights")
    ckpt.mkdir(exist_ok=True)
    if manifest is not None:
        (ckpt / "manifest.csv").write_text(manifest)
    for folder in folders:
        (data_dir / folder).mkdir(parents=True, exist_ok=True)
    for name in targets:
        lay_out(data_dir, name)
    fake, calls = tmp_path / "fake_python", tmp_path / "calls"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls.write_text("")
    env = preset_env(tmp_path, **{"PYTHON": str(fake), "CALLS": str(calls),
                                  "CKPT_DIR": str(ckpt), "DATA_DIR": str(data_dir), "JOBS": "1",
                                  **env})
    # what `python data.py present` would print (a new interpreter would cost seconds of
    # imports; the command line itself: test_present_means_loadable_offline_...)
    env["PRESENT"] = " ".join(name for name in data.DATASETS
                              if data.dataset_present(name, env["DATA_DIR"]))
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh"), "imagenet"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, calls.read_text().splitlines()


HEADER = "file,norm,eps,seed\n"


@pytest.mark.parametrize("manifest,files,expect", [
    (HEADER + "a.pt,l2,0\nb.pt,l2,0.5\n", ["a.pt"], "line 3: checkpoint not found"),
    (HEADER + "a.pt,l2\n", ["a.pt"], "line 2: expected file,norm,eps[,seed[,model]]"),
    (HEADER + "a.pt,l2,0,0,torchvision:resnet18,x\n", ["a.pt"],
     "expected file,norm,eps[,seed[,model]]"),
    (HEADER + "a.pt,l2,0,0,resnet18\n", ["a.pt"],
     "model 'resnet18' is neither torchvision:NAME nor package.module:function"),
    (HEADER + "a.pt,l1,0.5\n", ["a.pt"], "unknown norm 'l1' (l2 or linf)"),
    (HEADER + "a.pt,linf,half\n", ["a.pt"], "eps 'half' is not a number"),
    (HEADER + "a.pt,linf,4/0\n", ["a.pt"], "eps '4/0' is not a number"),
    (HEADER + "a.pt,l2,0.5,first\n", ["a.pt"], "seed 'first'"),
    (HEADER + "a.pt,l2,0.5\nb.pt,l2,0.5,0\n", ["a.pt", "b.pt"],
     "a second checkpoint for cell l2_eps0.5_seed0"),
    ("a.pt,l2,0.5\n", ["a.pt"], "the first line must be the header"),
    (HEADER + "\n", [], "lists no checkpoint"),
    (None, [], "manifest not found"),
], ids=["missing-file", "missing-column", "extra-column", "bad-model", "unknown-norm", "bad-eps",
        "zero-denominator", "bad-seed", "duplicate-cell", "no-header", "no-rows", "no-manifest"])
def test_a_bad_manifest_is_one_line_before_any_work(tmp_path, manifest, files, expect):
    proc, calls = fake_run(tmp_path, manifest, files)
    assert assert_user_error(proc, expect).startswith("error: ")
    assert calls == [] and not (tmp_path / "res").exists()


def test_missing_ckpt_dir_data_and_targets_are_one_line(tmp_path):
    manifest = HEADER + "a.pt,l2,0\n"
    proc, _ = fake_run(tmp_path, manifest, ["a.pt"], CKPT_DIR=str(tmp_path / "absent"))
    assert_user_error(proc, "CKPT_DIR not found")
    proc, _ = fake_run(tmp_path, manifest, ["a.pt"], CKPT_DIR="")
    assert_user_error(proc, "needs CKPT_DIR")
    proc, calls = fake_run(tmp_path, manifest, ["a.pt"], DATA_DIR=str(tmp_path / "nodata"))
    assert_user_error(proc, "DATA_DIR/val", str(tmp_path / "nodata" / "val"))
    assert calls == []
    assert not (tmp_path / "res").exists()


def test_manifest_rows_become_cells_evaluated_never_trained(tmp_path):
    """The study's declaration comes first; every row is a cell named like the trained
    presets', evaluated by advtrain.py --eval-only with the row's norm, eps and seed (default 0)
    as what the model was trained with; Fisher, transfer and inversion read the file in
    CKPT_DIR, which stays untouched; the judge is the largest L2 eps; UNSAFE_LOAD=1 reaches
    every script; the transfer targets are those data.py finds in DATA_DIR, or TARGETS_LIST."""
    manifest = (HEADER + "std.pth,l2,0\nrobust3.ckpt,l2,3,0\r\nrobust1.ckpt, l2 ,1\n"
                "sub/linf.ckpt,linf,4/255,1")
    files = ["std.pth", "robust3.ckpt", "robust1.ckpt", "sub/linf.ckpt"]
    proc, calls = fake_run(tmp_path, manifest, files, targets=("cifar10",), UNSAFE_LOAD="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    declare = f"report.py --declare imagenet {tmp_path / 'res'}"
    report = f"report.py {tmp_path / 'res'}"
    assert calls[0] == declare and calls[-1] == report and calls.count(declare) == 1
    calls = calls[1:]
    ckpt = tmp_path / "ckpt"
    cells = {"l2_eps0_seed0": ("std.pth", "l2 --trained-eps 0 --trained-seed 0"),
             "l2_eps3_seed0": ("robust3.ckpt", "l2 --trained-eps 3 --trained-seed 0"),
             "l2_eps1_seed0": ("robust1.ckpt", "l2 --trained-eps 1 --trained-seed 0"),
             "linf_eps4_255_seed1": ("sub/linf.ckpt", "linf --trained-eps 4/255 --trained-seed 1")}
    scripts = ("advtrain.py", "fisher.py", "transfer.py", "invert.py", "report.py")
    by_script = {s: [c for c in calls if c.startswith(s)] for s in scripts}
    assert [len(by_script[s]) for s in scripts] == [4, 4, 4, 4, 1]
    for cell, (file, training) in cells.items():
        out = f"--out {tmp_path / 'res' / cell}"
        ev = [c for c in by_script["advtrain.py"] if c.endswith(out)]
        assert len(ev) == 1 and f"--eval-only --ckpt {ckpt / file} --dataset imagenet" in ev[0], ev
        assert f"--trained-norm {training}" in ev[0] and "--resume" not in ev[0]
        assert " --norm " not in ev[0] and " --eps " not in ev[0] and " --seed " not in ev[0]
        for script in ("fisher.py", "transfer.py", "invert.py"):
            assert any(c.startswith(f"{script} --ckpt {ckpt / file} ") and c.endswith(out)
                       for c in calls), script
    assert all("--unsafe-load" in c for c in calls if not c.startswith("report.py"))
    assert all(f"--judge {ckpt / 'robust3.ckpt'} " in c for c in by_script["invert.py"])
    assert all("--target cifar10 " in c and "--target cifar100" not in c
               for c in by_script["transfer.py"])
    assert sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()) == sorted(
        files + ["manifest.csv"])
    assert "4 cells in" in proc.stdout and "robust3.ckpt" in proc.stdout

    proc, calls = fake_run(tmp_path, manifest, files, targets=("cifar10",), UNSAFE_LOAD="1")
    assert proc.returncode == 0 and calls == [declare, report]
    assert proc.stdout.count(": skip ") == 16
    # other targets and no unpickling: transfer is redone with them, the rest for the flag
    proc, calls = fake_run(tmp_path, manifest, files, TARGETS_LIST="svhn mnist")
    assert proc.returncode == 0 and not any("--unsafe-load" in c for c in calls)
    assert all("--target svhn --target mnist --shots" in c
               for c in calls if c.startswith("transfer.py"))


def test_a_manifest_row_may_name_any_classifier(tmp_path):
    """A fifth column builds the cell's model (README "Your own model"): torchvision:NAME is
    --arch, package.module:function is --model, for every script of the cell; the judge is
    the largest L2 eps among the rows of our or the published layouts."""
    manifest = (HEADER.strip() + ",model\nstd.pth,l2,0\nnext.pth,l2,3,0,torchvision:convnext_tiny\n"
                "mine.pt,linf,4/255,0, mypkg.nets:build\n")
    files = ["std.pth", "next.pth", "mine.pt"]
    proc, calls = fake_run(tmp_path, manifest, files, TARGETS_LIST="cifar10")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ckpt = tmp_path / "ckpt"
    for cell, flags in (("l2_eps3_seed0", "--arch torchvision:convnext_tiny"),
                        ("linf_eps4_255_seed0", "--model mypkg.nets:build")):
        own = [c for c in calls if c.endswith(f"--out {tmp_path / 'res' / cell}")]
        assert len(own) == 4 and all(flags in c for c in own), own
    plain = [c for c in calls if c.endswith(f"--out {tmp_path / 'res' / 'l2_eps0_seed0'}")]
    assert len(plain) == 4 and not any("--arch" in c or "--model" in c for c in plain)
    assert all(f"--judge {ckpt / 'std.pth'} " in c for c in calls if c.startswith("invert.py"))


def test_without_an_l2_checkpoint_inversion_has_no_judge(tmp_path):
    proc, calls = fake_run(tmp_path, HEADER + "a.pt,linf,4/255\n", ["a.pt"], TARGETS_LIST="cifar10")
    assert proc.returncode == 0, proc.stderr
    assert [c for c in calls if c.startswith("invert.py") and "--judge" not in c]


def test_dataset_present_answers_for_the_layouts_data_py_reads(tmp_path, monkeypatch):
    """Present exactly when every file of a layout is there (each one missing: absent); the
    Fashion-MNIST system copy counts; imagenet is DATA_DIR/val; synthetic is made, so always."""
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", str(tmp_path / "system"))
    for name in LAYOUTS:
        for missing in LAYOUTS[name]:
            folder = tmp_path / f"{name}-without-{missing.replace('/', '_')}"
            lay_out(folder, name, skip=missing)
            assert not data.dataset_present(name, folder), (name, missing)
        lay_out(tmp_path / name, name)
        assert data.dataset_present(name, tmp_path / name), name
        others = [other for other in LAYOUTS if other != name]
        assert not any(data.dataset_present(other, tmp_path / name) for other in others), name
    lay_out(tmp_path / "system-copy", "fashion-mnist")
    system_copy = tmp_path / "system-copy" / "fashion-mnist"
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", str(system_copy))
    assert data.dataset_present("fashion-mnist", tmp_path / "empty")
    assert not data.dataset_present("imagenet", tmp_path)
    assert data.dataset_present("synthetic", tmp_path)
    (tmp_path / "val").mkdir()
    assert data.dataset_present("imagenet", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.dataset_present("imagenet21k", tmp_path)


def write_idx(path, array):
    """An IDX file (the MNIST distribution's format), gzipped when the name ends in .gz."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_present_means_loadable_offline_and_the_command_line_lists_the_present(tmp_path):
    """MNIST written in its layout is both present and read by load_split without a download;
    `python data.py present` prints the present names in the order asked, one a line."""
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    for rel in LAYOUTS["mnist"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write_idx(tmp_path / rel, images if "images" in rel else np.array([7, 1, 4]))
    assert data.dataset_present("mnist", tmp_path)
    x, y = data.load_split("mnist", False, tmp_path, download=False)
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [7, 1, 4]
    assert torch.equal(x[0, 0] * 255, torch.from_numpy(images[0]).float())
    lay_out(tmp_path, "svhn")
    present = ("data.py", "present", "--data-dir", tmp_path)
    proc = run_main(*present, "cifar10", "svhn", "synthetic", "mnist")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["svhn", "synthetic", "mnist"]
    assert_user_error(run_main(*present, "mnist", "imagenet1k"), "imagenet1k")


@pytest.mark.slow
def test_smoke_end_to_end(tmp_path):
    """The imagenet preset's whole code path on fake checkpoints (a robustness file and a
    torchvision state dict, 10 classes) and a 40-image folder: one model per norm, too few for
    any trend or eps-0 contrast, so C1-C5 are undetermined; a claim decided can only be at level
    models. Bounded: a few minutes at most."""
    out = tmp_path / "res"
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh"), "imagenet", "--smoke"], cwd=ROOT,
                          env=preset_env(tmp_path, PYTHON=sys.executable), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = {"l2_eps0_seed0": ("l2", 0.0), "linf_eps4_255_seed0": ("linf", 4 / 255)}
    assert {p.parent.name for p in out.glob("*/metrics.json")} == set(expected)
    for cell, (norm, eps) in expected.items():
        for name in ("metrics.json", "fisher.json", "transfer.json", "invert.json"):
            assert (out / cell / name).is_file(), (cell, name)
        metrics = json.loads((out / cell / "metrics.json").read_text())
        assert (metrics["norm"], metrics["seed"], metrics["dataset"], metrics["test_size"]) == (
            norm, 0, "imagenet", 4)
        assert metrics["eps"] == pytest.approx(eps)
        radii = {(r["norm"], round(r["eps"], 6)) for r in metrics["robust_acc"]}
        assert {("l2", 0.5), ("linf", round(8 / 255, 6))} <= radii, cell
        assert "synthetic:0-4" in json.loads((out / cell / "transfer.json").read_text())
        invert = json.loads((out / cell / "invert.json").read_text())
        assert invert["baseline"]["judge_acc"] is not None
    assert (out / "report.md").is_file()
    assert json.loads((out / "study.json").read_text())["preset"] == "imagenet-smoke"
    claims = json.loads((out / "summary.json").read_text())["claims"]
    assert set(claims) == {f"C{i}" for i in range(1, 7)}
    assert all(claims[f"C{i}"]["verdict"] == "undetermined" for i in range(1, 6)), claims
    assert all((c["level"] is None) == (c["verdict"] == "undetermined")
               and c["level"] in (None, "models") for c in claims.values()), claims
    assert sorted(p.name for p in (out / "fake" / "ckpt").iterdir()) == sorted(
        ["manifest.csv", "resnet18_l2_eps0.pth", "resnet18_linf_eps4.ckpt"])


@pytest.fixture(scope="module")
def torchvision_ckpt(tmp_path_factory):
    """A plain torchvision ResNet-18 state dict (10 classes) and a 10-class folder of 10 images."""
    root = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    torch.save(model.state_dict(), root / "r18.pth")
    write_folder(root / "data", per_class=1)
    return root


@pytest.mark.slow
def test_eval_only_a_torchvision_state_dict_on_an_imagenet_folder(torchvision_ckpt, tmp_path):
    root = torchvision_ckpt
    argv = ["advtrain.py", "--eval-only", "--ckpt", root / "r18.pth", "--dataset", "imagenet",
            "--data-dir", root / "data", "--trained-norm", "linf", "--trained-eps", "4/255",
            "--trained-seed", "3", "--eval-eps", "l2:0.5", "--eval-steps", "1", "--device", "cpu"]
    proc = run_main(*argv, "--test-size", "4", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    keys = ("norm", "seed", "dataset", "arch", "test_size")
    assert tuple(metrics[k] for k in keys) == ("linf", 3, "imagenet", "resnet18", 4)
    assert metrics["eps"] == pytest.approx(4 / 255)
    radii = [(r["norm"], round(r["eps"], 6)) for r in metrics["robust_acc"]]
    assert radii == [("l2", 0.5), ("linf", round(4 / 255, 6))]
    assert_user_error(run_main(*argv, "--test-size", "11", "--out", tmp_path),
                      "asked for 11 test examples")
    assert_user_error(run_main(*argv[:8], "--trained-eps", "1", "--out", tmp_path),
                      "needs --trained-norm")


def test_eval_only_keeps_our_checkpoints_training_and_imagenet_is_not_for_training(tiny_ckpt,
                                                                                   tmp_path):
    """Our checkpoints record norm, eps and seed: a contradicting value is an error (the
    metrics would be filed under a radius the model never had); agreeing values are fine."""
    for flag, value in (("--trained-eps", "1.0"), ("--trained-norm", "linf"),
                        ("--trained-seed", "7"), ("--dataset", "mnist")):
        with pytest.raises(common.UserError, match=f"{flag} .* contradicts"):
            advtrain.main(advtrain.get_args(["--eval-only", "--ckpt", str(tiny_ckpt), flag, value,
                                             "--out", str(tmp_path)]))
    advtrain.main(advtrain.get_args(["--eval-only", "--ckpt", str(tiny_ckpt), "--trained-eps",
                                     "0.5", "--trained-norm", "l2", "--trained-seed", "0",
                                     "--test-size", "16", "--eval-steps", "1",
                                     "--out", str(tmp_path)]))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    keys = ("norm", "eps", "seed", "dataset")
    assert tuple(metrics[k] for k in keys) == ("l2", 0.5, 0, "fashion-mnist")
    assert_user_error(run_main("advtrain.py", "--dataset", "imagenet", "--epochs", "1"),
                      "invalid choice for training", "--eval-only")
