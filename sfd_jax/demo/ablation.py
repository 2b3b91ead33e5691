"""`--mode=ablation`: the paper's ablations at CPU scale on the demo's data (configs/ablation.py, docs/ablation.md).

    python -m sfd_jax.main --config=configs/ablation.py --workdir=ablation_workdir --mode=ablation

Every setting trains the demo's DiT with the demo's budget (steps, batch, optimiser) from scratch, once per seed:
SFD with several Δt, texture-only LightningDiT with and without REPA, and SFD with the *random* DINOv2 (its own
SemVAE and extraction). Each run is scored unguided at `eval_fractions` of the budget with the demo's judge: FID in
the judge's feature space against the test split, and class consistency.

Data stages come from the demo's pipeline (`pipeline.prepare`, cached in `<workdir>/demo`, or in
`ablation.demo_workdir`): nothing is trained twice. Stopping: each run keeps DiT checkpoints in
`runs/<setting>/seed<k>/` (the loop resumes from them) and each score is written once to `scores/step_<n>.json`;
a finished run leaves `result.json` and is skipped. Runs go seed by seed (every setting's seed 0 first), so a
partial ablation covers every setting.
"""

from __future__ import annotations

import json
import logging
import os
import time

import ml_collections
import numpy as np

from sfd_jax.demo import ablation_report, pipeline, train_stages
from sfd_jax.demo.outputs import write_json

log = logging.getLogger("sfd_jax.demo")


def run(config, workdir: str) -> dict:
    with pipeline._quiet_orbax():
        return _run(config, os.path.abspath(workdir))


def _run(config, workdir: str) -> dict:
    t0 = time.perf_counter()
    a = config.ablation
    os.makedirs(workdir, exist_ok=True)
    demo_dir = a.demo_workdir or os.path.join(workdir, "demo")
    # The demo's stages see the demo's config only, so that a finished `make demo` workdir is accepted as is.
    demo_fields = {k: v for k, v in config.to_dict().items() if k != "ablation"}
    demo_config = ml_collections.ConfigDict({**demo_fields, "mode": "demo"})
    p = pipeline.prepare(demo_config, demo_dir)
    clf = p["stages"].run("classifier", lambda: _classifier(config, p["workdir"]))
    settings = [dict(s) for s in a.settings]
    names = [s["name"] for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"ablation.settings: names must be unique, got {names}")
    runs = [(s, int(seed)) for seed in a.seeds for s in settings]
    ran, limit = [], int(a.get("max_runs", 0) or 0)
    for setting, seed in runs:
        out = os.path.join(workdir, "runs", setting["name"], f"seed{seed}")
        if os.path.exists(os.path.join(out, "result.json")):
            continue
        if limit and len(ran) >= limit:
            log.info("[ablation] stopping after %d runs (ablation.max_runs); re-run to continue", limit)
            break
        latents = _latents(config, p, setting)
        log.info(
            "[ablation] run %s seed %d (%d of %d finished)",
            setting["name"],
            seed,
            _count_done(workdir, runs),
            len(runs),
        )
        _train_and_score(config, p, clf["weights"], setting, seed, latents, out)
        ran.append(f"{setting['name']}/seed{seed}")
    summary = ablation_report.collect(workdir, settings, [int(s) for s in a.seeds])
    summary.update(
        {
            "ran_in_this_invocation": ran,
            "this_invocation_wall_s": time.perf_counter() - t0,
            "machine": p["machine"],
            "demo_workdir": p["workdir"],
            "budget": {
                "steps": int(a.num_steps),
                "batch_size": int(config.dit.train.batch_size),
                "eval_fractions": list(a.eval_fractions),
                "samples_per_class": int(a.samples_per_class),
            },
            "linear_probe": (p["vfm"] or {}).get("probe"),
        }
    )
    write_json(os.path.join(workdir, "ablation.json"), summary)
    ablation_report.plots(workdir, summary)
    ablation_report.log_table(summary)
    return summary


def _count_done(workdir: str, runs) -> int:
    return sum(os.path.exists(os.path.join(workdir, "runs", s["name"], f"seed{k}", "result.json")) for s, k in runs)


def _classifier(config, workdir: str) -> dict:
    from sfd_jax.demo import eval_stages

    return eval_stages.classifier(config, workdir)


def _latents(config, p: dict, setting: dict) -> str:
    """The latents directory a setting trains on; the random encoder's is extracted once, in the demo's workdir."""
    if setting.get("encoder", "pretrained") == "pretrained":
        return os.path.join(p["workdir"], "latents")
    if p["sv_random"] is None:
        raise ValueError(
            f"setting {setting['name']} needs the random encoder's SemVAE: the demo config must pretrain "
            "its DINOv2 (dino.ssl.steps > 0) with demo.semvae_random = True"
        )
    p["stages"].run(
        "extract_random",
        lambda: train_stages.extract(
            config,
            p["workdir"],
            p["tv"]["weights"],
            p["vfm"]["random_directory"],
            p["sv_random"]["weights"],
            p["dino_size"],
            out="latents_random",
        ),
    )
    return os.path.join(p["workdir"], "latents_random")


def run_config(config, p: dict, setting: dict, seed: int, latents: str):
    """The demo's DiT config with this setting's objective, seed, data and the ablation's budget."""
    a = config.ablation
    cfg = train_stages.dit_config(config, p["workdir"], p["grid"], p["width"])
    steps = int(a.num_steps)
    every = sorted({max(1, round(f * steps)) for f in a.eval_fractions})
    cfg.seed = seed
    cfg.data.path = latents
    cfg.diffusion.delta_t = float(setting.get("delta_t", 0.0))
    if not setting.get("semantic", True):
        cfg.diffusion.update(semantic_chans=0, delta_t=0.0)
    if not setting.get("repa", True):
        cfg.repa.weight = 0.0
    cfg.train.update(num_steps=steps, ckpt_every=int(np.gcd.reduce(every)), keep_last=2)
    cfg.eval.every = int(np.gcd.reduce(every))
    return cfg, every


def _train_and_score(config, p: dict, judge_dir: str, setting: dict, seed: int, latents: str, out: str) -> None:
    from sfd_jax.train import loop

    cfg, score_steps = run_config(config, p, setting, seed, latents)
    scorer = Scorer(config, judge_dir, p["tv"]["weights"], latents, float(cfg.diffusion.delta_t))
    os.makedirs(os.path.join(out, "scores"), exist_ok=True)

    def score(ctx) -> dict:
        path = os.path.join(out, "scores", f"step_{ctx.step}.json")
        if ctx.step in score_steps and not os.path.exists(path):
            t0 = time.perf_counter()
            result = {"step": ctx.step, **scorer(ctx.model(ema=True))}
            result["seconds"] = time.perf_counter() - t0
            write_json(path, result)
            log.info(
                "[ablation] %s seed %d step %d: FID %.2f, class consistency %.1f%%",
                setting["name"],
                seed,
                ctx.step,
                result["fid"],
                100 * result["class_consistency"],
            )
        return {}

    from sfd_jax.checkpoint import Checkpoints

    ckpt = Checkpoints(out, keep_last=10**9)  # only read here; the loop manages its own
    start = ckpt.latest_step() or 0
    ckpt.close()
    if start:
        log.info("[ablation] resuming %s seed %d from the checkpoint of step %d", setting["name"], seed, start)
    t0 = time.perf_counter()
    result = loop.run(cfg, out, eval_fn=score)
    if result["preempted"]:
        raise SystemExit(f"[ablation] stopped by a signal in {out} at step {result['step']}; re-run to resume")
    scores = {}
    for step in score_steps:
        with open(os.path.join(out, "scores", f"step_{step}.json")) as f:
            scores[str(step)] = json.load(f)
    last = result.get("last_metrics") or {}
    write_json(
        os.path.join(out, "result.json"),
        {
            "setting": setting,
            "seed": seed,
            "scores": scores,
            "steps": result["step"],
            "resumed_from_step": start,
            "wall_s_this_invocation": time.perf_counter() - t0,
            "final_train_metrics": {k: float(v) for k, v in last.items() if isinstance(v, (int, float))},
        },
    )


_REFERENCE_STATS: dict = {}  # judge-feature statistics of the test split, computed once per process


class Scorer:
    """EMA DiT → unguided class-balanced samples → (FID in judge features vs the test split, class consistency)."""

    def __init__(self, config, judge_dir: str, tv_dir: str, latents: str, delta_t: float):
        from sfd_jax.convert.texture_vae import load_texture_vae
        from sfd_jax.eval.classifier import load_classifier
        from sfd_jax.eval.generator import (
            ImageGenerator,
            SamplerSettings,
            TextureDecoder,
            read_latent_stats,
        )

        s = config.sample
        _, vae = load_texture_vae(tv_dir)
        mean, std = read_latent_stats(os.path.join(latents, "stats.json"), vae.cfg.embed_dim)
        settings = SamplerSettings(
            solver=s.solver,
            rtol=float(s.rtol),
            atol=float(s.atol),
            delta_t=delta_t,
            step_control=s.step_control,
            phase_mode=s.phase_mode,
            max_steps=int(s.max_steps),
        )
        self.gen = ImageGenerator(
            TextureDecoder(vae, mean, std),
            settings=settings,
            seed=int(s.seed),
            per_device_batch=int(s.per_device_batch),
        )
        self.judge = load_classifier(judge_dir)
        self.num_classes = int(config.dit.data.num_classes)
        self.n = self.num_classes * int(config.ablation.samples_per_class)
        key = (judge_dir, config.demo.data_dir, int(config.demo.fid_test_images))
        if key not in _REFERENCE_STATS:
            _REFERENCE_STATS[key] = self._reference(config)
        self.ref = _REFERENCE_STATS[key]

    def _reference(self, config):
        from sfd_jax.demo.data import UnitRangeImages, padded_split
        from sfd_jax.eval.classifier import apply_batched
        from sfd_jax.eval.metrics import statistics

        test_x, _ = padded_split(config.demo.data_dir, "test")
        n_ref = min(int(config.demo.fid_test_images), len(test_x))
        return statistics(apply_batched(self.judge, UnitRangeImages(test_x[:n_ref]))[1])

    def __call__(self, model) -> dict:
        from sfd_jax.demo.data import UnitRangeImages
        from sfd_jax.eval.classifier import apply_batched
        from sfd_jax.eval.generator import class_labels
        from sfd_jax.eval.metrics import frechet_distance, statistics

        indices = np.arange(self.n)
        labels = class_labels(indices, num_images=self.n, num_classes=self.num_classes)
        images, stats = self.gen(model, indices, labels)
        logits, features = apply_batched(self.judge, UnitRangeImages(images))
        return {
            "fid": float(frechet_distance(*statistics(features), *self.ref)),
            "class_consistency": float((logits.argmax(-1) == labels).mean()),
            "nfe_per_image": float(np.mean([st.nfe_per_image for st in stats])),
            "num_images": int(self.n),
        }
