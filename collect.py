"""One results folder of run_all.sh read into rows: every subfolder with a metrics.json is a
run (the file contract of DESIGN.md: metrics.json, fisher.json, transfer.json with its
per-example correct/*.npz, invert.json), and DIR/study.json the study's declaration. A file
that breaks the contract is a UserError naming it. numpy and the standard library only.
"""
import json
import zipfile
from pathlib import Path

import numpy as np

from claims import DECLARATIONS, declaration_problem, number
from common import RENAMED_METHODS, UserError

FISHER_KEYS = ("weights_trace", "weights_trace_empirical", "input_trace", "input_lambda_max",
               "repr_trace", "repr_lambda_max", "repr_trace_normalized")
REQUIRED_METRICS = ("norm", "eps", "clean_acc", "robust_acc", "seed")


def read_json(path, required=False):
    """The JSON object in path; None when the file is absent (and not required)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        if required:
            raise UserError(f"{path} not found")
        return None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})")
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data


def robust_records(path, records):
    """The robust_acc list of metrics.json: records {norm, eps, acc, ...}; unknown keys dropped."""
    if not isinstance(records, list) or not all(
            isinstance(r, dict) and {"norm", "eps", "acc"} <= set(r)
            and (number(r["acc"]) is None or 0 <= r["acc"] <= 1) for r in records):
        raise UserError(f"{path}: robust_acc must be a list of {{norm, eps, acc, ...}} records, "
                        "acc in [0, 1]")
    keep = ("norm", "eps", "attack", "steps", "restarts", "acc")
    return [{k: r[k] for k in keep if k in r} for r in records]


def transfer_measures(transfer):
    """{measure: accuracy} of a transfer.json: per target (an entry holding `acc`), its full-data
    probe ("target"), its K-shot probes ("target K-shot") and fine-tuning ("target fine-tuned")."""
    measures = {}
    for target, v in transfer.items():
        if not isinstance(v, dict) or number(v.get("acc")) is None:
            continue
        measures[target] = number(v["acc"])
        for shots, few in (v.get("few_shot") or {}).items():
            if isinstance(few, dict) and number(few.get("acc")) is not None:
                measures[f"{target} {shots}-shot"] = number(few["acc"])
        if isinstance(v.get("finetune"), dict) and number(v["finetune"].get("acc")) is not None:
            measures[f"{target} fine-tuned"] = number(v["finetune"]["acc"])
    return measures


def per_example(run, transfer):
    """{measure: 0/1 correctness} from the .npz files that transfer.json names under `correct`:
    "probe" [N] -> "target", "<K>-shot" [draws, N] -> "target K-shot", "fine-tuned" [N]."""
    out = {}
    for target, v in transfer.items():
        if not isinstance(v, dict) or not isinstance(v.get("correct"), str):
            continue
        path = run / v["correct"]
        if not path.is_file():
            continue
        try:
            with np.load(path) as npz:
                out.update({target if k == "probe" else f"{target} {k}": npz[k] for k in npz.files})
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(f"{path} is not a readable .npz ({e})")
    return out


def inversion(v):
    """One method of invert.json: ssim, psnr, judge_acc and per-image SSIM (None when absent)."""
    out = {k: number(v.get(k)) for k in ("ssim", "psnr", "judge_acc")}
    images = v["per_image"].get("ssim") if isinstance(v.get("per_image"), dict) else None
    ok = isinstance(images, list) and images and all(number(x) is not None for x in images)
    out["per_image_ssim"] = [float(x) for x in images] if ok else None
    return out


def collect_run(run):
    """One row (nested dict) for the run folder `run`."""
    path = run / "metrics.json"
    m = read_json(path, required=True)
    missing = [k for k in REQUIRED_METRICS if k not in m]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: not a metrics.json of advtrain.py")
    if number(m["eps"]) is None or number(m["eps"]) < 0 or number(m["clean_acc"]) is None \
            or not isinstance(m["seed"], int):
        raise UserError(f"{path}: eps and clean_acc must be numbers (eps >= 0), seed an integer")
    row = {"run": run.name, "role": "judge" if run.name.startswith("judge") else "study",
           "norm": m["norm"], "eps": float(m["eps"]), "seed": m["seed"],
           "clean_acc": float(m["clean_acc"]), "robust_acc": robust_records(path, m["robust_acc"])}
    row.update({k: m[k] for k in ("arch", "dataset", "classes", "epochs", "train_seconds",
                                  "test_size", "device", "precision") if k in m})
    fisher = read_json(run / "fisher.json") or {}
    row["fisher"] = {k: number(fisher[k]) for k in FISHER_KEYS if number(fisher.get(k)) is not None}
    transfer = read_json(run / "transfer.json") or {}
    row["transfer"], row["correct"] = transfer_measures(transfer), per_example(run, transfer)
    invert = read_json(run / "invert.json") or {}
    row["invert"] = {RENAMED_METHODS.get(meth, meth): inversion(v) for meth, v in invert.items()
                     if isinstance(v, dict) and "ssim" in v}
    if len(row["invert"]) < sum(isinstance(v, dict) and "ssim" in v for v in invert.values()):
        raise UserError(f"{run / 'invert.json'} holds one method under two names "
                        f"({', '.join(f'{a} = {b}' for a, b in RENAMED_METHODS.items())})")
    disjoint = invert.get("disjoint")
    row["invert_disjoint"] = disjoint if isinstance(disjoint, bool) else None
    return row


def collect_rows(results_dir):
    """One row per run folder (a subfolder holding metrics.json): study runs in numeric eps
    order (then norm, seed), the judge runs last."""
    rows = [collect_run(p.parent) for p in Path(results_dir).glob("*/metrics.json")]
    return sorted(rows, key=lambda r: (r["role"] != "study", r["eps"], r["norm"], r["seed"]))


def read_declaration(results):
    """{preset, decisions, source} from results/study.json; without one, the quick preset's."""
    path = results / "study.json"
    if not path.is_file():
        print(f"no study.json in {results}: applying the defaults, DECLARATIONS[\"quick\"]",
              flush=True)
        return {"preset": "quick", "decisions": DECLARATIONS["quick"], "source": "defaults"}
    study = read_json(path, required=True)
    problem = declaration_problem(study.get("decisions"))
    if problem:
        raise UserError(f"{path}: {problem}")
    return {"preset": study.get("preset"), "decisions": study["decisions"], "source": "study.json",
            "redeclared": study.get("redeclared", [])}


def read_incomplete(results):
    """The steps run_all.sh found not finished (DIR/incomplete.tsv: cell, step, log relative to
    DIR; failed, stopped or never run), each with its log's last line: [{cell, step, log,
    last}]; [] without the file."""
    path = Path(results) / "incomplete.tsv"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        cell, step, log = (line.split("\t") + ["", ""])[:3]
        path = Path(results) / log
        lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
        last = lines[-1][:200] if lines else "empty log: stopped at its start" \
            if path.is_file() else "never ran"
        steps.append({"cell": cell, "step": step, "log": log, "last": last})
    return steps
