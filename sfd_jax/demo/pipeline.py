"""The demo's driver: stage bookkeeping in the workdir, the order of the stages, and the outputs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

from sfd_jax.demo import eval_stages, outputs, train_stages
from sfd_jax.demo.data import check_data
from sfd_jax.demo.outputs import write_json
from sfd_jax.demo.train_stages import RANDOM_VFM_WARNING

log = logging.getLogger("sfd_jax.demo")

CONFIG_FILE = "demo_config.json"


# ================================================================================================================
# Stage bookkeeping
# ================================================================================================================
class Stages:
    """Runs each stage at most once per workdir; `stages/<name>.json` = {'wall_s', 'result'} marks it done."""

    def __init__(self, workdir: str):
        self.dir = os.path.join(workdir, "stages")
        os.makedirs(self.dir, exist_ok=True)
        self.records: dict[str, dict] = {}

    def run(self, name: str, fn) -> dict:
        path = os.path.join(self.dir, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                record = json.load(f)
            record["cached"] = True
            log.info("[demo] stage %s: done in an earlier run (%.1fs), skipped", name, record["wall_s"])
        else:
            log.info("[demo] stage %s: running", name)
            t0 = time.perf_counter()
            result = fn()
            record = {"wall_s": time.perf_counter() - t0, "result": result}
            write_json(path, record)
            record["cached"] = False
            log.info("[demo] stage %s: finished in %.1fs", name, record["wall_s"])
        self.records[name] = record
        return record["result"]


def _check_workdir_config(workdir: str, config) -> None:
    """A workdir belongs to one config: cached stages made with other settings would be silently mixed.

    Only a setting present in both configs with another value is a change. A setting that exists on one side only
    was added to (or removed from) the code since the workdir was made: its cached stages ran with the behaviour
    that existed then, which a new field's default keeps. Those are reported, and the saved config is brought up to
    date, so that a later change of such a field is caught like any other.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    current = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed, one_sided = _diff(saved, current)
        if changed:
            raise ValueError(
                f"{workdir} holds a demo run with other settings ({', '.join(sorted(changed)[:8])}); pass "
                "another --workdir (or delete this one) to run with the new config"
            )
        if one_sided:
            log.warning(
                "[demo] %s was made by an older version: settings %s are new or gone; its finished stages are kept",
                workdir,
                ", ".join(sorted(one_sided)[:8]),
            )
            write_json(path, current)
    else:
        write_json(path, current)


def _diff(a, b, prefix: str = "") -> tuple[list[str], list[str]]:
    """(paths whose values differ, paths present on one side only) of two JSON trees."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return ([] if a == b else [prefix.rstrip(".")]), []
    changed, one_sided = [], []
    for k in set(a) | set(b):
        if k not in a or k not in b:
            one_sided.append(f"{prefix}{k}")
            continue
        c, o = _diff(a[k], b[k], f"{prefix}{k}.")
        changed += c
        one_sided += o
    return changed, one_sided


def machine_rate(n: int = 2048, repeats: int = 5) -> dict:
    """The plain fp32 n² matmul rate of this machine now (best of `repeats`) and its load average: printed and stored
    beside every timing so that runs on different or busy machines can be compared."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return {
        "matmul_2048_fp32_gflops": round(2 * n**3 / best / 1e9, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# ================================================================================================================
# run
# ================================================================================================================
def run(config, workdir: str) -> dict:
    """All stages (cached), then report.json, samples.png and loss.png in `workdir`. Returns the report."""
    t_run = time.perf_counter()
    with _quiet_orbax():
        return _run(config, workdir, t_run)


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs every checkpoint step at INFO through absl; the demo's console keeps to the stages' progress."""

    def keep(record) -> bool:
        return record.levelno >= logging.WARNING or "orbax" not in record.pathname

    absl = logging.getLogger("absl")
    absl.addFilter(keep)
    try:
        yield
    finally:
        absl.removeFilter(keep)


def prepare(config, workdir: str) -> dict:
    """The data stages (cached in `workdir`): machine rate, DINOv2 (pretrained here, given, or random), texture
    VAE, SemVAE(s) and the latent extraction. `--mode=ablation` reuses them from the demo's workdir."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    check_data(config.demo.data_dir)
    _check_workdir_config(workdir, config)
    machine = machine_rate()
    log.info(
        "[demo] this machine: 2048² fp32 matmul %.0f GFLOP/s, load average %s (stage times scale roughly "
        "with 1 / this rate)",
        machine["matmul_2048_fp32_gflops"],
        machine["load_average"],
    )
    stages = Stages(workdir)
    vfm = None
    if train_stages.pretrains_dinov2(config):
        vfm = stages.run("dinov2_pretrain", lambda: train_stages.pretrain_dinov2(config, workdir))
        dino_dir, random_vfm = vfm["directory"], False
    else:
        dino_dir, random_vfm = train_stages.dinov2(config, workdir)
    if random_vfm:
        log.warning("\n%s\n[demo] %s\n%s", "!" * 100, RANDOM_VFM_WARNING, "!" * 100)
    grid = train_stages.latent_grid(config)
    dino_size, width = train_stages.dino_geometry(dino_dir, grid)

    tv = stages.run("texture_vae", lambda: train_stages.texture_vae(config, workdir))
    sv = stages.run("semvae", lambda: train_stages.semvae(config, workdir, dino_dir, dino_size, width))
    sv_random = None
    if vfm is not None and config.demo.semvae_random:
        # The same SemVAE on the random encoder's tokens: how much of the reconstruction quality is the encoder's.
        sv_random = stages.run(
            "semvae_random",
            lambda: train_stages.semvae(
                config, workdir, vfm["random_directory"], dino_size, width, name="semvae_random"
            ),
        )
    stages.run(
        "extract", lambda: train_stages.extract(config, workdir, tv["weights"], dino_dir, sv["weights"], dino_size)
    )
    return dict(
        workdir=workdir,
        machine=machine,
        stages=stages,
        vfm=vfm,
        dino_dir=dino_dir,
        random_vfm=random_vfm,
        grid=grid,
        dino_size=dino_size,
        width=width,
        tv=tv,
        sv=sv,
        sv_random=sv_random,
    )


def _run(config, workdir: str, t_run: float) -> dict:
    p = prepare(config, workdir)
    workdir, stages, tv, grid, width = p["workdir"], p["stages"], p["tv"], p["grid"], p["width"]
    random_vfm, dino_size, machine = p["random_vfm"], p["dino_size"], p["machine"]
    dit = stages.run("dit", lambda: train_stages.dit(config, workdir, grid, width))
    clf = stages.run("classifier", lambda: eval_stages.classifier(config, workdir))
    samples = {
        mode: stages.run(f"sample_{mode}", lambda m=mode: eval_stages.sample(config, workdir, m, tv["weights"], dit))
        for mode in eval_stages.MODES
    }
    ev = stages.run("evaluate", lambda: eval_stages.evaluate(config, workdir, clf["weights"], tv["weights"], samples))

    report = outputs.write_report(
        config,
        workdir,
        stages.records,
        random_vfm=random_vfm,
        geometry={"latent": [grid, grid, 48], "tokens": grid * grid, "dino_size": dino_size, "dino_width": width},
        run_wall_s=time.perf_counter() - t_run,
        machine=machine,
    )
    outputs.samples_png(workdir, samples, float(config.demo.guidance_scale), int(config.demo.grid_columns), ev)
    outputs.loss_png(workdir)
    outputs.log_summary(report)
    if random_vfm:
        log.warning("[demo] %s", RANDOM_VFM_WARNING)
    return report
