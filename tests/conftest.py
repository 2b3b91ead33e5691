"""Test setup: 8 fake CPU devices, fp32 everywhere, golden data from tests/golden (see tests/golden/README.md)."""
import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# OpenBLAS's default threading makes the 2048×2048 eigendecompositions of FID ~10× slower on this 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTDATA = REPO / "tests" / "golden"
OFFICIAL = TESTDATA / "official"
EVAL = TESTDATA / "eval"


def load_golden(name: str, folder: pathlib.Path = OFFICIAL) -> dict:
    path = folder / name
    if not path.exists():
        pytest.fail(f"golden file missing: {path} (the golden vectors ship with the repository in tests/golden)")
    with np.load(path, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="session")
def golden():
    return load_golden
