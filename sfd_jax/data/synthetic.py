"""A learnable synthetic source of training batches (data.source = 'synthetic').

Each sample is drawn from a class-conditional Gaussian: for class c,
    x1 = pattern * a_c + mean_c + noise_scale * ε,     dino = proto_c + token_pattern
where `pattern` (16, 16, C) and `token_pattern` (T, 768) are fixed, and mean_c (C,), a_c (scalar), proto_c (768,)
are fixed per class -- all from `seed`. A model that learns the class means lowers the flow-matching loss well below
that of an untrained one, and the REPA targets are predictable from the label, so every loss term can fall.

Batch k of the run is a function of (seed, k) only: row r of global batch k uses a numpy generator seeded with
(seed, k, r), and process p produces rows [p·b, (p+1)·b) of it (b = its local batch). The global batch is therefore
the same for any process count, and `get_state()` / `set_state()` only need the batch counter.

Format (the training-batch format all sources share): x1 float32 (b, 16, 16, C) with C = 48 ([texture 0:32 |
semantic 32:48]), y int32 (b,) in [0, num_classes), dino (b, T, 768) in `dino_dtype` (float32 or bfloat16).
"""

from __future__ import annotations

import numpy as np

_TABLE_STREAM = 0x5FD  # separates the fixed tables' random stream from the per-row streams


class SyntheticLatents:
    """Implements the loop's data-iterator protocol: `next()`, `get_state()`, `set_state()`."""

    def __init__(
        self,
        *,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        seed: int = 0,
        num_classes: int = 1000,
        size: int = 16,
        channels: int = 48,
        tokens: int = 256,
        dino_dim: int = 768,
        noise_scale: float = 0.5,
        dino_dtype: str = "float32",
    ):
        if batch_size <= 0:
            raise ValueError(f"synthetic data: batch_size={batch_size} must be positive")
        if not 0 <= process_index < process_count:
            raise ValueError(f"synthetic data: process_index={process_index} not in [0, {process_count})")
        if not 1 <= num_classes <= 1000:
            raise ValueError(f"data.num_classes={num_classes}: expected 1..1000 (1000 is the null label)")
        self.batch_size = int(batch_size)
        self.process_index = int(process_index)
        self.seed = int(seed)
        self.num_classes = int(num_classes)
        self.noise_scale = float(noise_scale)
        self.shape = (size, size, channels)
        if dino_dtype == "bfloat16":
            import ml_dtypes

            self.dino_dtype = np.dtype(ml_dtypes.bfloat16)
        else:
            self.dino_dtype = np.dtype(dino_dtype)
        table = np.random.default_rng([self.seed, _TABLE_STREAM])
        self.pattern = table.standard_normal(self.shape).astype(np.float32)
        self.class_mean = table.standard_normal((num_classes, channels)).astype(np.float32)
        self.class_scale = table.uniform(-1.0, 1.0, num_classes).astype(np.float32)
        self.proto = table.standard_normal((num_classes, dino_dim)).astype(np.float32)
        self.token_pattern = (0.5 * table.standard_normal((tokens, dino_dim))).astype(np.float32)
        self.step = 0

    def _row(self, step: int, row: int):
        rng = np.random.default_rng([self.seed, step, row])
        y = int(rng.integers(self.num_classes))
        x1 = (
            self.pattern * self.class_scale[y]
            + self.class_mean[y]
            + self.noise_scale * rng.standard_normal(self.shape, dtype=np.float32)
        )
        return x1, y

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        first = self.process_index * self.batch_size
        rows = [self._row(self.step, first + i) for i in range(self.batch_size)]
        x1 = np.stack([r[0] for r in rows]).astype(np.float32)
        y = np.asarray([r[1] for r in rows], np.int32)
        dino = (self.proto[y][:, None, :] + self.token_pattern[None]).astype(self.dino_dtype)
        self.step += 1
        return {"x1": x1, "y": y, "dino": dino}

    def get_state(self) -> dict:
        return {"source": "synthetic", "step": self.step, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if state.get("source", "synthetic") != "synthetic":
            raise ValueError(f"synthetic data: cannot resume from a {state.get('source')!r} iterator state")
        self.step = int(state["step"])


def make_iterator(data_config, *, batch_size: int, process_index: int, process_count: int, seed: int):
    """Same signature as `sfd_jax.data.pipeline.make_iterator`; batch_size is the per-process batch."""
    return SyntheticLatents(
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        num_classes=int(data_config.get("num_classes", 1000)),
        noise_scale=float(data_config.get("noise_scale", 0.5)),
        dino_dtype=str(data_config.get("dino_dtype", "float32")),
    )
