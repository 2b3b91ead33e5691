"""What `--mode=ablation` leaves: ablation.json (per run and mean ± std per setting and checkpoint), the FID-vs-Δt
plot and the FID-vs-steps plot."""

from __future__ import annotations

import json
import logging
import os

import numpy as np

log = logging.getLogger("sfd_jax.demo")


def collect(workdir: str, settings: list[dict], seeds: list[int]) -> dict:
    """Reads every finished run's result.json; mean and sample std over the finished seeds of each setting."""
    out, finished = {}, 0
    for s in settings:
        runs = {}
        for seed in seeds:
            path = os.path.join(workdir, "runs", s["name"], f"seed{seed}", "result.json")
            if os.path.exists(path):
                with open(path) as f:
                    runs[str(seed)] = json.load(f)
        finished += len(runs)
        steps = sorted({int(k) for r in runs.values() for k in r["scores"]})
        curve = {}
        for step in steps:
            row = {}
            for metric in ("fid", "class_consistency"):
                v = np.array([r["scores"][str(step)][metric] for r in runs.values() if str(step) in r["scores"]])
                row[metric] = {
                    "mean": float(v.mean()),
                    "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "n": len(v),
                    "values": v.tolist(),
                }
            curve[str(step)] = row
        out[s["name"]] = {
            "setting": s,
            "finished_seeds": sorted(int(k) for k in runs),
            "by_step": curve,
            "final": curve[str(steps[-1])] if steps else None,
            "runs": {
                k: {"scores": r["scores"], "final_train_metrics": r.get("final_train_metrics")} for k, r in runs.items()
            },
        }
    total = len(settings) * len(seeds)
    return {
        "settings": out,
        "finished_runs": finished,
        "total_runs": total,
        "complete": finished == total,
        "seeds": seeds,
        "std_note": "sample standard deviation (ddof 1) over the finished seeds",
    }


def _final(entry):
    f = entry.get("final")
    return None if f is None else (f["fid"]["mean"], f["fid"]["std"], f["fid"]["n"])


def plots(workdir: str, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = summary["settings"]
    paths = []
    tag = "" if summary["complete"] else f" (partial: {summary['finished_runs']}/{summary['total_runs']} runs)"

    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=120)
    sfd = sorted(
        (e["setting"]["delta_t"], _final(e))
        for e in settings.values()
        if e["setting"].get("semantic", True)
        and e["setting"].get("encoder", "pretrained") == "pretrained"
        and _final(e)
    )
    if sfd:
        x = [d for d, _ in sfd]
        ax.errorbar(
            x,
            [f[0] for _, f in sfd],
            yerr=[f[1] for _, f in sfd],
            marker="o",
            capsize=4,
            label="SFD, pretrained DINOv2",
        )
    colours = iter(["tab:gray", "tab:orange", "tab:purple"])
    for e in settings.values():
        f, s = _final(e), e["setting"]
        if f is None:
            continue
        if not s.get("semantic", True):
            c = next(colours)
            ax.axhspan(f[0] - f[1], f[0] + f[1], color=c, alpha=0.25)
            ax.axhline(f[0], color=c, lw=1, label=f"{s['name']} (mean ± std)")
        elif s.get("encoder", "pretrained") != "pretrained":
            ax.errorbar(
                [s["delta_t"] + 0.01],
                [f[0]],
                yerr=[f[1]],
                marker="s",
                capsize=4,
                ls="none",
                color="tab:red",
                label="SFD, random DINOv2",
            )
    ax.set_xlabel("Δt (semantic lead)")
    ax.set_ylabel("FID (judge features), unguided")
    ax.set_title("FID at the end of the budget" + tag, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(workdir, "fid_vs_delta_t.png"))
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=120)
    for name, e in settings.items():
        steps = sorted(int(k) for k in e["by_step"])
        if not steps:
            continue
        m = np.array([e["by_step"][str(k)]["fid"]["mean"] for k in steps])
        sd = np.array([e["by_step"][str(k)]["fid"]["std"] for k in steps])
        ax.plot(steps, m, marker="o", label=name)
        ax.fill_between(steps, m - sd, m + sd, alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (judge features), unguided")
    ax.set_yscale("log")
    ax.set_title("Convergence, mean ± std over seeds" + tag, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(workdir, "fid_vs_steps.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def table(summary: dict) -> str:
    """Markdown table: one row per setting, FID and class consistency at every scored step (mean ± std, n)."""
    steps = sorted({int(k) for e in summary["settings"].values() for k in e["by_step"]})
    head = "| setting | " + " | ".join(f"FID @ {s}" for s in steps) + " | class consistency @ end | seeds |"
    lines = [head, "|" + "---|" * (len(steps) + 3)]
    for name, e in summary["settings"].items():
        cells = []
        for s in steps:
            r = e["by_step"].get(str(s))
            cells.append("–" if r is None else f"{r['fid']['mean']:.2f} ± {r['fid']['std']:.2f}")
        f = e["final"]
        cc = (
            "–"
            if f is None
            else f"{100 * f['class_consistency']['mean']:.1f} ± {100 * f['class_consistency']['std']:.1f}%"
        )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cc} | {len(e['finished_seeds'])} |")
    return "\n".join(lines)


def log_table(summary: dict) -> None:
    log.info("[ablation] %d of %d runs finished\n%s", summary["finished_runs"], summary["total_runs"], table(summary))
