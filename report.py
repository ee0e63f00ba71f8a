"""Collect one results folder into report.md, summary.json and plots; judge claims C1-C5.

    python report.py results/quick        # after `bash run_all.sh`
    python report.py results/paper

Every subfolder with a metrics.json is a run (the judge classifier of the inversion, in a
folder named `judge`, is listed but not part of any claim). Runs are grouped by norm, and
within a norm by eps; seeds give a mean and a standard error (SE = sd / sqrt(seeds)).

The rule for every claim: a difference counts only when it exceeds twice its standard error
(the SEs of the two means added in quadrature); with one seed there is no noise estimate and
the rule reduces to the sign of the difference, which the report says. "X falls as eps grows"
means: the Spearman rank correlation of the per-eps means with eps is <= -0.7 and the mean at
the largest eps is below the mean at eps = 0 by the rule above ("rises": the mirror image).
"""
import json
import math
from pathlib import Path

from advtrain import ArgumentParser, UserError, atomic_save, format_eps, mean_se, user_errors

FISHER_KEYS = ("weights_trace", "weights_trace_empirical", "input_trace", "input_lambda_max",
               "repr_trace", "repr_lambda_max", "repr_trace_normalized")
RHO = 0.7  # Spearman threshold for a monotone trend over the eps grid


# ----------------------------------------------------------------------------- statistics

def spearman(a, b):
    """Spearman rank correlation (average ranks for ties); 0 when either side is constant."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    sa = math.sqrt(sum((x - ma) ** 2 for x in ra))
    sb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (sa * sb) if sa > 0 and sb > 0 else 0.0


def exceeds_noise(diff, se_a, se_b):
    """A difference counts when it exceeds twice its standard error (or, with no noise
    estimate, when it is non-zero in the claimed direction: diff > 0)."""
    return diff > 2 * math.sqrt(se_a ** 2 + se_b ** 2)


def trend(series, direction):
    """series: {eps: (mean, se)}; direction +1 (rises) or -1 (falls) with eps.
    Returns (holds, evidence text)."""
    eps = sorted(series)
    if len(eps) < 2 or eps[0] != 0:
        return None, "needs eps = 0 and at least one eps > 0"
    means = [series[e][0] for e in eps]
    rho = spearman(eps, means)
    lo, hi = series[eps[0]], series[eps[-1]]
    significant = exceeds_noise(direction * (hi[0] - lo[0]), lo[1], hi[1])
    holds = direction * rho >= RHO and significant
    values = ", ".join(f"{format_eps(e)}: {fmt(series[e])}" for e in eps)
    return holds, f"{values} (Spearman {rho:+.2f}; end-to-end change {'exceeds' if significant else 'within'} 2 SE)"


def fmt(mean_and_se):
    mean, se = mean_and_se
    return f"{mean:.4g}" + (f" ± {se:.2g}" if se else "")


# ----------------------------------------------------------------------------- collection

def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})")


def collect_rows(results_dir):
    """One flat dict per run folder: eps, norm, seed, accuracies, Fisher, transfer, inversion."""
    rows = []
    for metrics_path in sorted(Path(results_dir).glob("*/metrics.json")):
        run = metrics_path.parent
        m = read_json(metrics_path)
        missing = [k for k in ("norm", "eps", "clean_acc", "adv_acc") if k not in m]
        if missing:
            raise UserError(f"{metrics_path} lacks {', '.join(missing)}: not a metrics.json of advtrain.py")
        row = {"run": run.name, "role": "judge" if run.name.startswith("judge") else "study",
               "norm": m["norm"], "eps": m["eps"], "seed": m.get("seed", 0),
               "clean_acc": m["clean_acc"], "adv_acc": m["adv_acc"]}
        row.update({f"pgd@{radius}": acc for radius, acc in m["adv_acc"].items()})
        fisher = read_json(run / "fisher.json") or {}
        row.update({k: fisher[k] for k in FISHER_KEYS if k in fisher})
        for target, t in (read_json(run / "transfer.json") or {}).items():
            row[f"transfer:{target}"] = t["acc"]
        for method, inv in (read_json(run / "invert.json") or {}).items():
            for k in ("psnr", "ssim", "judge_acc"):
                if k in inv:
                    row[f"invert:{method}:{k}"] = inv[k]
        rows.append(row)
    return rows


def by_eps(rows, key):
    """{eps: (mean, se)} over seeds of rows[key], for the rows that have it."""
    groups = {}
    for r in rows:
        if r.get(key) is not None:
            groups.setdefault(r["eps"], []).append(r[key])
    return {e: mean_se(v) for e, v in groups.items()}


def common_eval_eps(rows):
    """The PGD evaluation radii every run of a norm group was attacked with."""
    keys = [set(r["adv_acc"]) for r in rows]
    return sorted(set.intersection(*keys), key=float) if keys else []


# ----------------------------------------------------------------------------- claims

def judge_claims(rows):
    """{claim id: {holds, evidence}} for C1-C5, from the study rows (judge excluded)."""
    study = [r for r in rows if r["role"] == "study"]
    norms = sorted({r["norm"] for r in study})
    claims = {}

    def verdict(cid, parts):
        known = [h for h, _ in parts if h is not None]
        holds = bool(known) and all(known)
        evidence = "; ".join(e for _, e in parts) or "no data"
        claims[cid] = {"holds": holds if known else None, "evidence": evidence}

    c1, c2, c3, c4, c5 = [], [], [], [], []
    for norm in norms:
        g = [r for r in study if r["norm"] == norm]
        h, e = trend(by_eps(g, "clean_acc"), -1)
        c1.append((h, f"[{norm}] clean accuracy falls: {e}"))
        radii = common_eval_eps(g)
        for ev in radii:
            h, e = trend(by_eps(g, f"pgd@{ev}"), +1)
            # Decided at the largest common radius: at a smaller one, models trained with a
            # larger eps lose PGD accuracy along with clean accuracy (the trade-off itself).
            decisive = ev == radii[-1]
            c1.append((h if decisive else None,
                       f"[{norm}] PGD accuracy at eps {ev} rises{'' if decisive else ' (not decisive)'}: {e}"))

        for key in sorted({k for r in g for k in r if k.startswith("transfer:")}):
            series = by_eps(g, key)
            if 0 not in series or len(series) < 2:
                continue
            best = max((e for e in series if e > 0), key=lambda e: series[e][0])
            gain = series[best][0] - series[0][0]
            h = exceeds_noise(gain, series[best][1], series[0][1])
            largest = max(series)
            tradeoff = "falls again at larger eps" if series[largest][0] < series[best][0] else "still rising at the largest eps"
            c2.append((h, f"[{norm}] {key[9:]}: best eps {format_eps(best)} {fmt(series[best])} vs eps 0 "
                          f"{fmt(series[0])} (gain {gain:+.4f}, {'exceeds' if h else 'within'} 2 SE; {tradeoff})"))

        h, e = trend(by_eps(g, "weights_trace"), -1)
        c3.append((h, f"[{norm}] tr F_w: {e}"))
        for key in ("input_trace", "input_lambda_max"):
            h, e = trend(by_eps(g, key), -1)
            c4.append((h, f"[{norm}] {key}: {e}"))

        methods = sorted({k.split(":")[1] for r in g for k in r if k.startswith("invert:")})
        for method in methods:
            # Closeness to the original decides (SSIM); judge accuracy is evidence only: it
            # is capped by the judge's own accuracy on the originals and saturates early.
            for metric in ("ssim", "judge_acc"):
                h, e = trend(by_eps(g, f"invert:{method}:{metric}"), +1)
                c5.append((h if metric == "ssim" else None,
                           f"[{norm}] {method} {metric} rises with eps{'' if metric == 'ssim' else ' (not decisive)'}: {e}"))
        if {"baseline", "improved"} <= set(methods):
            diffs = [r["invert:improved:ssim"] - r["invert:baseline:ssim"] for r in g
                     if r["eps"] > 0 and "invert:improved:ssim" in r and "invert:baseline:ssim" in r]
            if diffs:
                m, se = mean_se(diffs)
                h = exceeds_noise(m, se, 0.0)
                c5.append((h, f"[{norm}] improved - baseline SSIM over the {len(diffs)} robust runs: "
                              f"{m:+.4f} ± {se:.2g} ({'exceeds' if h else 'within'} 2 SE)"))
    for cid, parts in zip(("C1", "C2", "C3", "C4", "C5"), (c1, c2, c3, c4, c5)):
        verdict(cid, parts)
    seeds = sorted({r["seed"] for r in study})
    if len(seeds) < 2:
        for c in claims.values():
            c["evidence"] += " [one seed: no noise estimate, differences judged by sign]"
    return claims


CLAIM_TEXT = {
    "C1": "robustness costs source accuracy (clean accuracy falls, PGD accuracy rises with eps)",
    "C2": "adversarial training improves linear transferability (best at some eps > 0, above eps = 0)",
    "C3": "it reduces the Fisher information of the weights (tr F_w falls with eps)",
    "C4": "it reduces the Fisher information about the input (tr F_x and lambda_max fall with eps)",
    "C5": "robust representations are more invertible, and the improved inversion beats the baseline",
}


# ----------------------------------------------------------------------------- output

def markdown(rows, claims, plots):
    keys = ["clean_acc"] + sorted({k for r in rows for k in r if k.startswith("pgd@")}, key=lambda k: float(k[4:]))
    keys += [k for k in FISHER_KEYS if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r if k.startswith(("transfer:", "invert:"))})
    lines = ["# Results", "", "| run | norm | eps | seed | " + " | ".join(keys) + " |",
             "|" + "---|" * (4 + len(keys))]
    for r in sorted(rows, key=lambda r: (r["role"], r["norm"], r["eps"], r["seed"])):
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else "" for k in keys]
        lines.append(f"| {r['run']} | {r['norm']} | {format_eps(r['eps'])} | {r['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "pgd@E: accuracy under PGD at radius E (eval settings in each metrics.json); "
              "the `judge` run only labels reconstructions for invert.py.", "", "# Claims", "",
              "A difference counts when it exceeds twice its standard error over seeds; a trend needs "
              f"|Spearman| >= {RHO} over the eps grid and a significant end-to-end change.", ""]
    for cid, c in claims.items():
        word = {True: "holds", False: "does not hold", None: "not measured"}[c["holds"]]
        lines += [f"- **{cid} {word}**: {CLAIM_TEXT[cid]}.  ", f"  Evidence: {c['evidence']}"]
    if plots:
        lines += ["", "# Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def make_plots(rows, out_dir):
    """accuracy_vs_eps.png, transfer_vs_eps.png and fisher_vs_eps.png (log axis), if matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    study = [r for r in rows if r["role"] == "study"]
    groups = {
        "accuracy_vs_eps.png": ["clean_acc"] + sorted({k for r in study for k in r if k.startswith("pgd@")}),
        "transfer_vs_eps.png": sorted({k for r in study for k in r if k.startswith("transfer:")}),
        "fisher_vs_eps.png": [k for k in ("weights_trace", "input_trace", "input_lambda_max", "repr_trace_normalized")
                              if any(k in r for r in study)],
    }
    written = []
    for name, keys in groups.items():
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for norm in sorted({r["norm"] for r in study}):
            g = [r for r in study if r["norm"] == norm]
            for key in keys:
                s = by_eps(g, key)
                eps = sorted(s)
                ax.errorbar(eps, [s[e][0] for e in eps], yerr=[2 * s[e][1] for e in eps],
                            marker="o", capsize=3, label=f"{norm} {key}")
        if name.startswith("fisher"):
            ax.set_yscale("log")
        ax.set_xlabel("training eps")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(out_dir) / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def get_args(argv=None):
    p = ArgumentParser(description="Summarise a results folder and judge claims C1-C5.")
    p.add_argument("results_dir", help="folder whose subfolders hold metrics.json (and fisher/transfer/invert.json)")
    return p.parse_args(argv)


def main(args):
    results = Path(args.results_dir)
    if not results.is_dir():
        raise UserError(f"results folder not found: {results}")
    rows = collect_rows(results)
    if not rows:
        raise UserError(f"no run with a metrics.json under {results}")
    claims = judge_claims(rows)
    plots = make_plots(rows, results)
    grids = sorted(p.relative_to(results).as_posix() for p in results.glob("*/invert.png"))
    text = markdown(rows, claims, plots)
    if grids:
        text += "\n# Inversions\n\n" + "\n".join(f"![{g}]({g})" for g in grids) + "\n"
    atomic_save(results / "summary.json", {"rows": rows, "claims": claims})
    atomic_save(results / "report.md", text)
    for cid, c in claims.items():
        print(f"{cid} holds={c['holds']}", flush=True)
    print(f"wrote {results / 'report.md'} and summary.json ({len(rows)} runs)", flush=True)


if __name__ == "__main__":
    with user_errors():
        main(get_args())
