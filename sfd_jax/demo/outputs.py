"""What `--mode=demo` leaves for a person: report.json, samples.png, loss.png and a summary in the log."""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from sfd_jax.data.records import write_json_atomic
from sfd_jax.data.sources import FASHION_MNIST_CLASSES

MODE_TITLES = {"unguided": "unguided", "autoguidance": "AutoGuidance"}


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend; only the demo's figures need it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the demo's figures need matplotlib: pip install 'sfd_jax[demo]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_json(path: str, obj) -> None:
    """Atomic (records.write_json_atomic); numpy values become lists, anything else unknown its str()."""
    write_json_atomic(path, obj, indent=2, default=_json_default)


def _json_default(obj):
    if isinstance(obj, (np.generic, np.ndarray)):
        return np.asarray(obj).tolist()
    return str(obj)


def write_report(
    config,
    workdir: str,
    records: dict,
    *,
    random_vfm: bool,
    geometry: dict,
    run_wall_s: float,
    machine: dict | None = None,
) -> dict:
    """report.json: every stage's result, per-stage wall time (of the run that finished the stage), and a summary."""
    from sfd_jax.demo.train_stages import RANDOM_VFM_WARNING

    results = {name: rec["result"] for name, rec in records.items()}
    ev, clf = results["evaluate"], results["classifier"]
    modes = [m for m in MODE_TITLES if f"sample_{m}" in results]
    summary = {
        "classifier_test_accuracy": clf["test_accuracy"],
        "class_consistency": {m: ev[m]["class_consistency"] for m in modes},
        "fid_classifier_features": {m: ev[m]["fid_classifier"] for m in modes},
        "real_train_images": {k: ev["real_train_images"][k] for k in ("class_consistency", "fid_classifier")},
        "vae_reconstructions": {k: ev["vae_reconstructions"][k] for k in ("class_consistency", "fid_classifier")},
        "nfe_per_image": {m: results[f"sample_{m}"]["nfe_per_image"] for m in modes},
        "autoguidance": {
            "scale": float(config.demo.guidance_scale),
            "guide_step": results["dit"]["guide_step"],
            "final_step": results["dit"]["steps"],
        },
    }
    report = {
        "variant": config.get("variant", "default"),
        "summary": summary,
        "wall_time_s": {
            "stages": {name: round(rec["wall_s"], 2) for name, rec in records.items()},
            "stages_total": round(sum(rec["wall_s"] for rec in records.values()), 2),
            "this_run": round(run_wall_s, 2),
            "cached_in_this_run": [name for name, rec in records.items() if rec.get("cached")],
        },
        "dinov2": _dinov2_summary(results, random_vfm, RANDOM_VFM_WARNING),
        "machine": machine,
        "geometry": geometry,
        "stages": results,
        "nfe_note": "NFE counts velocity evaluations of the batch; with AutoGuidance each is one main-model and one "
        "guide forward.",
    }
    write_json(os.path.join(workdir, "report.json"), report)
    return report


def _semvae_cos(result: dict) -> dict:
    ev = result.get("eval") or {}
    return {"posterior_sample": ev.get("eval/cos_sim"), "posterior_mean": ev.get("eval/cos_sim_mu")}


def _dinov2_summary(results: dict, random_vfm: bool, warning: str) -> dict:
    out = {"random": random_vfm, "directory": results["semvae"]["dinov2"]}
    pre = results.get("dinov2_pretrain")
    if random_vfm:
        out["note"] = warning
    elif pre is None:
        out["note"] = "given checkpoint (demo.vfm_checkpoint)"
    else:
        out["note"] = "pretrained here, self-supervised (SimCLR NT-Xent) on the train split's images, no labels"
        out["linear_probe_test_accuracy"] = {k: v["test_accuracy"] for k, v in pre["probe"].items()}
        out["ssl_steps"] = pre["ssl"]["steps"]
    cos = {"pretrained" if not random_vfm else "random": _semvae_cos(results["semvae"])}
    if "semvae_random" in results:
        cos["random"] = _semvae_cos(results["semvae_random"])
    out["semvae_heldout_cosine"] = cos
    return out


def _class_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, columns: int) -> np.ndarray:
    """uint8 (rows·(h+2), columns·(w+2), 3): row k = the first `columns` images generated for class k."""
    h, w = images.shape[1:3]
    grid = np.full((num_classes * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for k in range(num_classes):
        for j, i in enumerate(np.flatnonzero(labels == k)[:columns]):
            grid[k * (h + 2) + 1 : k * (h + 2) + 1 + h, j * (w + 2) + 1 : j * (w + 2) + 1 + w] = images[i]
    return grid


def samples_png(workdir: str, samples: dict, scale: float, columns: int, evaluation: dict) -> str:
    plt = _pyplot()
    num_classes = len(FASHION_MNIST_CLASSES)
    fig, axes = plt.subplots(
        1, len(samples), figsize=(1.2 + 3.4 * len(samples) * columns / 8, 5.2), dpi=120, squeeze=False
    )
    for ax, (mode, result) in zip(axes[0], samples.items()):
        with np.load(result["path"]) as z:
            grid = _class_grid(z["images"], z["labels"], num_classes, columns)
        ax.imshow(grid, interpolation="nearest")
        cell = grid.shape[0] / num_classes
        ax.set_yticks([(k + 0.5) * cell for k in range(num_classes)], FASHION_MNIST_CLASSES, fontsize=7)
        ax.set_xticks([])
        title = MODE_TITLES[mode] + (f" (w = {scale:g})" if mode == "autoguidance" else "")
        ev = evaluation.get(mode, {})
        ax.set_title(
            f"{title}\nclass consistency {100 * ev.get('class_consistency', float('nan')):.1f}%, "
            f"FID_cls {ev.get('fid_classifier', float('nan')):.2f}",
            fontsize=8,
        )
    fig.tight_layout()
    path = os.path.join(workdir, "samples.png")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def loss_png(workdir: str) -> str:
    """Training curves of the texture VAE, the SemVAE and the DiT (from their metrics.jsonl)."""
    plt = _pyplot()
    panels = [
        ("texture VAE", "texture_vae", ["loss"]),
        ("SemVAE", "semvae", ["total", "mse", "cos"]),
        ("SFD DiT", "dit", ["loss", "loss_mse", "loss_cos", "loss_repa"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 3.4), dpi=110)
    for ax, (title, sub, keys) in zip(axes, panels):
        rows = _read(os.path.join(workdir, sub, "metrics.jsonl"))
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                steps, values = zip(*sorted(dict(pts).items()))
                ax.plot(steps, values, label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(workdir, "loss.png")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def log_summary(report: dict) -> None:
    s, t = report["summary"], report["wall_time_s"]
    lines = [f"judge test accuracy {100 * s['classifier_test_accuracy']:.1f}%"]
    for mode, title in MODE_TITLES.items():
        if mode in s["class_consistency"]:
            lines.append(
                f"{title:>12}: class consistency {100 * s['class_consistency'][mode]:.1f}%, "
                f"FID_cls {s['fid_classifier_features'][mode]:.2f}, NFE/image {s['nfe_per_image'][mode]:.0f}"
            )
    for key, title in (("vae_reconstructions", "VAE recon."), ("real_train_images", "real images")):
        lines.append(
            f"{title:>12}: class consistency {100 * s[key]['class_consistency']:.1f}%, "
            f"FID_cls {s[key]['fid_classifier']:.2f} (training images)"
        )
    lines.append(
        "stage wall time: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in t["stages"].items())
        + f" (total {t['stages_total']:.0f}s; this run {t['this_run']:.0f}s)"
    )
    logging.getLogger("sfd_jax.demo").info("[demo] results\n  %s", "\n  ".join(lines))
