"""`--config.profile.*` on the tiny DiT train: the trace of the chosen steps lands under <workdir>/profile."""

from sfd_jax.config_loader import load_config
from sfd_jax.train import loop


def test_profile_steps_write_a_trace(tmp_path):
    config = load_config("configs/sfd.py:tiny")
    config.train.update(num_steps=4, log_every=1, ckpt_every=1000, export_ema=False, async_checkpoint=False)
    config.profile.update(start_step=1, num_steps=2)
    loop.run(config, str(tmp_path))
    traces = sorted((tmp_path / "profile").rglob("*.xplane.pb"))
    # one trace (started at step 1, stopped at step 3), not an empty file
    assert len(traces) == 1, sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert traces[0].stat().st_size > 0
