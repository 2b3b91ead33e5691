"""configs/sfd.py variants and the one-time validation (errors name the field)."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from sfd_jax.train import build as loop
from sfd_jax.train import loop as train_loop
from sfd_jax.train.config import ConfigError, validate

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_module():
    spec = importlib.util.spec_from_file_location("sfd_config", REPO / "configs" / "sfd.py")  # VARIANTS too
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SFD = load_module()


def get(variant="tiny"):
    return SFD.get_config(variant)


def test_file_starts_with_the_command_that_runs_it():
    doc = SFD.__doc__
    assert "python -m sfd_jax.main --config=configs/sfd.py:tiny --workdir=" in doc.split("\n\n")[1]


@pytest.mark.parametrize("variant", SFD.VARIANTS)
def test_every_variant_validates_and_builds_its_model_config(variant):
    c = get(variant)
    derived = validate(c, device_count=8, process_count=2)
    assert derived["mesh_shape"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert derived["per_process_batch"] * 2 == c.train.batch_size
    model_cfg = loop.model_config(c, derived["model_channels"])
    channels = {"ablate_no_semantic": 32, "ablate_baseline": 32, "ablate_pca": 40}.get(variant, 48)
    assert model_cfg.in_channels == channels
    assert model_cfg.use_repa == (variant not in ("ablate_no_repa", "ablate_baseline"))


def test_paper_recipes():
    xl, x80, guide = get("xl"), get("xl_80ep"), get("guide_b")
    assert (xl.model.size, xl.optim.lr, xl.optim.b2, xl.repa.mode, xl.repa.weight, xl.train.num_steps) == (
        "xl",
        1e-4,
        0.999,
        "cos",
        1.0,
        4_000_000,
    )
    assert (x80.optim.lr, x80.optim.b2, x80.repa.mode, x80.repa.weight, x80.train.num_steps) == (
        2e-4,
        0.95,
        "cos_mse",
        0.5,
        400_000,
    )
    assert (xl.diffusion.delta_t, xl.diffusion.semantic_weight, xl.train.batch_size, xl.optim.ema_decay) == (
        0.3,
        2.0,
        256,
        0.9999,
    )
    assert (xl.optim.weight_decay, xl.optim.eps, xl.optim.warmup_steps, xl.optim.grad_clip) == (0.0, 1e-8, 0, 0.0)
    assert get("xxl").model.size == "xxl" and guide.model.size == "b" and guide.train.num_steps == 120_000
    assert get("ablate_sync").diffusion.delta_t == 0.0
    assert get("ablate_no_repa").repa.weight == 0.0
    assert get("ablate_no_semantic").diffusion.semantic_chans == 0


@pytest.mark.parametrize("variant", SFD.VARIANTS)
def test_loss_config_builds(variant):
    c = get(variant)
    loss = loop.loss_config(c)
    assert (loss.delta_t, loss.semantic_chans, loss.repa_weight) == (
        c.diffusion.delta_t,
        c.diffusion.semantic_chans,
        c.repa.weight,
    )


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="choose one of xl, xl_80ep"):
        get("xl_800ep")


@pytest.mark.parametrize(
    "field, value, device_count, message",
    [
        ("model.size", "huge", 8, r"config.model.size: 'huge' is not a model size; valid sizes: \('tiny', 'b'"),
        (
            "model.remat_policy",
            "some",
            8,
            r"config.model.remat_policy: 'some'; valid: \('full', 'dots', 'dots_no_batch'\)",
        ),
        ("train.batch_size", 12, 8, r"config.train.batch_size: 12 is not divisible by the data-parallel size 8"),
        ("mesh.ici", (2, 2, 1), 8, r"config.mesh.ici=\(2, 2, 1\): mesh size 4 != 8 .*device count 8"),
        ("mesh.ici", (3, -1, 1), 8, r"config.mesh.ici=\(3, -1, 1\)"),
        # the same resolution as parallel.make_mesh: one process is one DCN unit, so a data-centre axis of 2 is refused
        ("mesh.dcn", (2, 1, 1), 8, r"config.mesh.dcn=\(2, 1, 1\): 2 DCN units requested, but the devices form 1"),
        ("mesh.dcn", ("a", 1, 1), 8, r"config.mesh.dcn=\('a', 1, 1\): expected 3 integers"),
        ("diffusion.delta_t", 1.0, 8, r"config.diffusion.delta_t: 1.0 must lie in \[0, 1\)"),
        ("diffusion.delta_t", -0.1, 8, r"config.diffusion.delta_t"),
        ("repa.mode", "l2", 8, r"config.repa.mode: 'l2'; valid: \('cos', 'mse', 'cos_mse'\)"),
        ("data.source", "folder", 8, r"config.data.source: 'folder'; valid: \('synthetic', 'arrayrecord'\)"),
        ("train.nonfinite", "ignore", 8, r"config.train.nonfinite"),
        ("optim.b2", 1.0, 8, r"config.optim.b2"),
        ("mesh.rules.embed", "model", 8, r"config.mesh.rules.embed='model': unknown mesh axis"),
    ],
)
def test_validation_errors_name_the_field(field, value, device_count, message):
    c = get("tiny")
    *parents, leaf = field.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        validate(c, device_count=device_count)


def test_batch_must_split_over_processes_and_semantic_free_runs_are_synchronous():
    c = get("tiny")
    c.train.batch_size = 8
    c.mesh.ici = (1, 1, 1)
    with pytest.raises(ConfigError, match="not divisible by the process count 3"):
        validate(c, device_count=1, process_count=3)
    c = get("ablate_no_semantic")
    c.diffusion.delta_t = 0.3
    with pytest.raises(ConfigError, match="config.diffusion.delta_t: 0.3: without a semantic latent"):
        validate(c, device_count=8)


def test_eval_hook_needs_a_function():
    c = get("tiny")
    c.eval.every = 10
    from sfd_jax.eval.in_training import fid

    assert train_loop.resolve_eval_fn(c, None) is fid  # the default hook: in-training FID, settings in config.eval
    assert c.eval.num_images == 5000 and c.eval.solver == "dopri5"
    c.eval.fn = "sfd_jax.train.config:validate"
    assert train_loop.resolve_eval_fn(c, None) is validate
    c.eval.fn = ""
    with pytest.raises(ConfigError, match="config.eval.fn"):
        train_loop.resolve_eval_fn(c, None)


def test_eval_block_declares_every_field_the_in_training_fid_reads():
    from sfd_jax.eval import in_training

    c = get("tiny")
    assert set(c.eval.keys()) - {"every", "fn"} == set(in_training.FIELDS)
    block = in_training.read_block(c.eval, {"num_images": 16})
    assert block["num_images"] == 16 and block["solver"] == "dopri5" and block["delta_t"] is None
    partial = c.eval.to_dict()
    del partial["grid_size"]
    with pytest.raises(ValueError, match=r"config.eval lacks the in-training FID fields \['grid_size'\]"):
        in_training.read_block(partial)
    with pytest.raises(ValueError, match=r"unknown in-training eval fields \['num_image'\]"):
        in_training.make_eval_fn(num_image=16)


def test_the_config_file_imports_nothing_of_the_package():
    """Its defaults are its own: reading configs/sfd.py does not import sfd_jax (the eval stack least of all)."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(REPO / 'configs' / 'sfd.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.get_config('tiny')\n"
        "print(sorted(n for n in sys.modules if n.startswith('sfd_jax')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_derived_values_for_a_pod():
    c = get("xl")
    c.mesh.ici = (1, -1, 1)
    c.mesh.dcn = (-1, 1, 1)
    derived = validate(c, device_count=64, process_count=16, num_slices=2)
    assert derived["mesh_shape"] == {"data": 2, "fsdp": 32, "tensor": 1}
    assert derived["per_process_batch"] == 16 and derived["per_device_batch"] == 4


def _documented_commands():
    """(where, config spec, mode) of every `--config=configs/….py[:variant] … --mode=…` line the user is shown."""
    import re

    pattern = re.compile(r"--config=(configs/\w+\.py(?::\w+)?)\b.*?--mode=(\w+)")
    files = [REPO / "Makefile", REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted((REPO / "launch").glob("*.sh")) + sorted((REPO / "configs").glob("*.py"))
    found = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for spec, mode in pattern.findall(line):
                found.append((f"{path.relative_to(REPO)}:{number}", spec, mode))
    return found


def test_every_documented_command_names_the_mode_of_its_config():
    """main refuses a --mode that differs from the config's own `mode`, so a shown command that pairs them wrongly
    (as `make ablation` once did: an ablation config whose mode said 'demo') fails at once for every user."""
    from sfd_jax.config_loader import load_config

    found = _documented_commands()
    assert {"Makefile", "README.md"} <= {where.split(":")[0] for where, _, _ in found}
    wrong = [
        (where, spec, mode, config_mode)
        for where, spec, mode in found
        if (config_mode := load_config(spec).get("mode", "train")) != mode
    ]
    assert not wrong, wrong
