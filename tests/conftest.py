"""Test setup: 8 fake CPU devices, fp32 everywhere, golden data from tests/golden (see tests/golden/README.md)."""

import os
import pathlib

# The suite's XLA flags, for this process and every child a test starts (children that fake another device count
# take TEST_XLA_FLAGS and add their own). Compile time is most of the suite's time (768 of ~1,700 CPU seconds in a
# py-spy profile), and XLA's CPU backend optimisation level mostly buys run time the tiny test programs do not need:
# at level 1 instead of the default 3 the tiny demo's test ran in 79 s instead of 101 s on the idle 2-core machine.
# Programs mean the same at levels 1 and 3; users' programs compile at the default, and
# tests/test_train_step.py checks that the initialisers (which TrainSetup always compiles at level 1 on CPU) give the
# bits of a level-3 compile. Level 0 is not used: with the legacy emitters (--xla_cpu_use_fusion_emitters=false) it
# cut the suite's XLA compile time from 625 to 396 s, but a sample from two processes then differed from one
# process's by one uint8 step in one of 49,152 values (tests/test_multiprocess.py; level 0 also moves initial DiT
# weights by 2 ULP, sfd_jax/train/state.py). The FAST_COMPILE preset, --xla_llvm_disable_expensive_passes and a
# smaller codegen split changed nothing measurable.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS, "--xla_force_host_platform_device_count=8"]
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# OpenBLAS's default threading makes the 2048×2048 eigendecompositions of FID ~10× slower on this 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# JAX's persistent compilation cache, for the test processes and (inherited) every child they start. The suite compiles
# the same programs many times over: each trainer test runs its loop two or three times (uninterrupted, interrupted,
# resumed) with fresh closures that jit anew, the demo trains two SemVAEs of one shape, and every `python -m
# sfd_jax.main` child starts cold. With the cache each program compiles once per machine. Every program is stored, also
# those that compile in under a second (JAX's default threshold is 1 s): each child process and each xdist worker
# compiles the same small ones again (eager ops, data and metric helpers). Measured on test_train, test_preemption and
# test_sample with an empty cache, two interleaved pairs: 114 / 122 s with the 1 s threshold, 109 / 116 s with none (20
# vs 80 entries, 87 MB either way). The size cap turns on JAX's file lock around every read and write, which the two
# xdist workers and their children need: without it an entry is written in place, and a process reading it then would
# load half an executable.
_JAX_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "d" / "jax_compilation_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_JAX_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

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


def assert_close(got, ref, rel: float, *, scale: float | None = None, err_msg: str = "") -> float:
    """max |got − ref| ≤ rel · scale, with scale = max |ref| unless given; returns the max abs error.

    Float rounding errors (other BLAS kernels, thread counts, summation orders) grow with the magnitude of the
    values that flow through a computation, not with each element's own size, so an elementwise rtol fails on the
    small elements of a result and a bare atol means something different for every array. Both the tolerance and
    the scale go into the failure message.
    """
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{err_msg}: shape {got.shape} != expected {ref.shape}"
    if scale is None:
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    assert err <= rel * scale, f"{err_msg}: max abs error {err:.3g} > {rel:g} × scale {scale:.4g} (= {rel * scale:.3g})"
    return err


def assert_trees_close(got, ref, rel: float, *, err_msg: str = "") -> None:
    """`assert_close` on every leaf of two pytrees (same structure), against the max |value| of the whole `ref` tree.

    The tree's scale, not each leaf's: an optimizer step moves a near-zero leaf by rounding noise of the same
    absolute size as a large one (e.g. a 1.7e-7 difference in a leaf whose largest value is 1.6e-3).
    """
    import jax

    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(ref)
    assert got_def == ref_def, f"{err_msg}: tree structures differ"
    scale = max((float(np.max(np.abs(np.asarray(b)))) for _, b in ref_leaves if np.size(b)), default=0.0)
    for (path, a), (_, b) in zip(got_leaves, ref_leaves):
        assert_close(np.asarray(a), np.asarray(b), rel, scale=scale, err_msg=f"{err_msg}{jax.tree_util.keystr(path)}")


# ------------------------------------------------------------------------------------------- shared, expensive
def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist would re-sort files by test count, undoing FILE_SECONDS
        config.option.loadscopereorder = False
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controlling process only
        config._sfd_machine = _machine_rate()


def _machine_rate() -> str:
    """This machine's plain 2048² fp32 matmul rate now, printed after the run: the suite's time scales roughly with
    its inverse, and on a shared VM it moves by a third within the hour (127 against 200 GFLOP/s seen here)."""
    from sfd_jax.demo.pipeline import machine_rate

    m = machine_rate()
    return f"2048² fp32 matmul {m['matmul_2048_fp32_gflops']:.0f} GFLOP/s, load average {m['load_average']}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if getattr(config, "_sfd_machine", None):
        terminalreporter.write_line(f"machine at the start: {config._sfd_machine}")


@pytest.fixture(scope="session")
def inception_net_weights():
    """The golden FID Inception's weights (the `net/` rows of inception_fid.npz), regenerated once per session.

    test_inception and test_metrics both need the whole network (24M values, ~4 s to hash); the regeneration
    itself, with its checksums, is tested in test_inception.
    """
    from test_inception import regenerate_weights

    return regenerate_weights(load_golden("inception_fid.npz", EVAL), "net/")


# Heaviest test files first (seconds: setup + call + teardown summed per file from `--durations=0`, one cold run
# under `-n 2` on 2 cores, 2026-12-06). xdist hands out files in collection order (pytest_configure above stops it
# re-sorting them by test count): the long files start at once and the short ones fill in behind them; a file
# missing here goes last, which is where the previous table had left test_recipes and test_train_step.
FILE_SECONDS = {
    "test_demo.py": 162,
    "test_multiprocess.py": 127,
    "test_trainer_guards.py": 90,
    "test_dit.py": 49,
    "test_sampler.py": 49,
    "test_gcs.py": 49,
    "test_benchmarks.py": 44,
    "test_trainer_sharding.py": 44,
    "test_bad_inputs.py": 42,
    "test_sample.py": 37,
    "test_train.py": 36,
    "test_train_step.py": 36,
    "test_recipes.py": 35,
    "test_metrics.py": 34,
    "test_vfm_ssl.py": 29,
    "test_inference.py": 26,
    "test_extract.py": 22,
    "test_preemption.py": 20,
    "test_timestep_embedder.py": 16,
    "test_texture_vae_train.py": 16,
    "test_texture_vae.py": 14,
    "test_dinov2.py": 14,
    "test_parallel.py": 14,
    "test_semvae.py": 14,
    "test_semvae_loss_weights.py": 12,
    "test_inception.py": 12,
    "test_losses.py": 11,
    "test_launch.py": 11,
    "test_extract_semantic.py": 10,
    "test_pipeline.py": 5,
    "test_checkpoint.py": 5,
    "test_semvae_train.py": 5,
    "test_schedule.py": 5,
    "test_classifier.py": 4,
    "test_profiling.py": 3,
    "test_convert_dit.py": 2,
    "test_preprocess.py": 2,
    "test_imports.py": 1,
    "test_sources.py": 1,
    "test_programs.py": 0,
    "test_config.py": 0,
    "test_convert_stats.py": 0,
}


def pytest_collection_modifyitems(session, config, items):
    order = {name: i for i, name in enumerate(sorted(FILE_SECONDS, key=FILE_SECONDS.get, reverse=True))}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: tests keep their order in a file
