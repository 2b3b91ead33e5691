"""FID Inception-v3 vs pytorch-fid golden vectors (tests/golden/eval/inception_fid.npz).

See tests/golden/README.md.

The golden network's weights are not stored: they are regenerated here from the golden README's hash recipe (checked
against `param_sum` / `param_head` first), saved as a `.pth` with torch (the format of pytorch-fid's released file)
and loaded through `sfd_jax.convert.inception.load_inception`. The golden forward is pytorch-fid's
(`resize='torch'`); ADM's TF1 resize is checked on its own vector.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import EVAL, assert_close, load_golden

import sfd_jax  # noqa: F401  (switches off eager sharding)
from flax import nnx
from sfd_jax.convert.common import ConversionError
from sfd_jax.convert.inception import export_inception, load_inception, load_into
from sfd_jax.eval.features import ArrayImages, InceptionExtractor
from sfd_jax.models import inception as inc


# ----------------------------------------------------------------------------------------- weight regeneration
def hashed_values(n: int, seed: int, scale: float, offset: float) -> np.ndarray:
    """README weight recipe: lowbias32-style hash of (i + seed·0x9E3779B9) mod 2^32, 24-bit uniform, float64
    affine map, one rounding to float32. uint32 arithmetic wraps mod 2^32 as the recipe requires."""
    h = np.arange(n, dtype=np.uint32) + np.uint32((int(seed) * 0x9E3779B9) % 2**32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    u = (h >> np.uint32(8)).astype(np.float64) / 2.0**24
    return (offset + scale * (2.0 * u - 1.0)).astype(np.float32)


def regenerate_weights(golden: dict, prefix: str) -> dict[str, np.ndarray]:
    """{torch key: array} for the parameter rows named `prefix<key>`, each verified against its checksums."""
    out = {}
    for i, name in enumerate(golden["param_names"]):
        if not name.startswith(prefix):
            continue
        shape = tuple(int(s) for s in golden["param_shape"][i][: golden["param_ndim"][i]])
        v = hashed_values(
            int(np.prod(shape)), golden["param_seed"][i], golden["param_scale"][i], golden["param_offset"][i]
        )
        head = golden["param_head"][i][: min(8, v.size)]
        if not np.array_equal(v[: head.size], head):
            raise AssertionError(f"regenerated {name} differs from param_head")
        if np.sum(v.astype(np.float64)) != golden["param_sum"][i]:
            raise AssertionError(f"regenerated {name} differs from param_sum")
        out[name[len(prefix) :]] = v.reshape(shape)
    if not out:
        raise AssertionError(f"no parameter rows start with {prefix!r}")
    return out


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def golden():
    return load_golden("inception_fid.npz", EVAL)


@pytest.fixture(scope="module")
def net_weights(inception_net_weights):
    return inception_net_weights


@pytest.fixture(scope="module")
def model(net_weights, tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("inception") / "pt_inception-golden.pth"
    torch.save({k: torch.from_numpy(v) for k, v in net_weights.items()}, path)
    return load_inception(path)


@pytest.fixture(scope="module")
def net_out(model, golden):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, images):
        x = inc.preprocess(images, resize="torch")
        out = nnx.merge(graphdef, state)(x, return_stage_means=True)
        out["input"] = x
        return out

    return jax.device_get(forward(state, golden["net/images_u8"]))


# -------------------------------------------------------------------------------------------------------- tests
def test_all_parameter_rows_regenerate(golden):
    names = {str(n).split("/")[0] for n in golden["param_names"]}
    assert names == {"net", "block_A", "block_C", "block_E_1", "block_E_2"}
    total = sum(len(regenerate_weights(golden, f"{p}/")) for p in sorted(names))
    assert total == len(golden["param_names"]) == 647


def test_loaded_weights_round_trip(model, net_weights):
    exported = export_inception(model)
    assert exported.keys() == net_weights.keys()
    for key, value in net_weights.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_resized_input_matches_pytorch_fid(net_out, golden):
    x = net_out["input"].transpose(0, 3, 1, 2)  # NCHW like the golden
    assert_close(x[:, :, :24, :24], golden["net/input_resized_crop"], 2e-6)  # values in [-1, 1]; measured 6e-7
    # Per-element agreement ≤ 5e-7 (README) bounds the whole-image sum by 299²·5e-7 ≈ 0.045.
    sums = x.astype(np.float64).sum(axis=(2, 3))
    np.testing.assert_allclose(sums, golden["net/input_resized_sum"], rtol=0, atol=299 * 299 * 5e-7)


@pytest.mark.parametrize(
    "ours,theirs",
    [
        ("pool3", "net/pool3"),
        ("logits", "net/logits"),
        ("logits_nobias", "net/logits_nobias"),
        ("spatial", "net/spatial_sfid"),
    ],
)
def test_network_outputs_match_golden(net_out, golden, ours, theirs):
    assert net_out[ours].shape == golden[theirs].shape
    assert rel_err(net_out[ours], golden[theirs]) <= 1e-5


def test_stage_means_match_golden(net_out, golden):
    assert set(net_out["stage_means"]) == set(inc.STAGES)  # a jitted dict comes back key-sorted
    for stage in inc.STAGES:
        want = golden[f"net/stage_mean/{stage}"]
        got = net_out["stage_means"][stage]
        assert got.shape == want.shape, stage
        assert rel_err(got, want) <= 1e-5, stage


@pytest.mark.parametrize("block", ["A", "C", "E_1", "E_2"])
def test_blocks_match_golden(golden, block):
    make = {
        "A": lambda: inc.InceptionA(192, pool_features=32, rngs=nnx.Rngs(0)),
        "C": lambda: inc.InceptionC(768, channels_7x7=160, rngs=nnx.Rngs(0)),
        "E_1": lambda: inc.InceptionE(1280, pool="avg", rngs=nnx.Rngs(0)),
        "E_2": lambda: inc.InceptionE(2048, pool="max", rngs=nnx.Rngs(0)),
    }[block]
    module = load_into(make(), regenerate_weights(golden, f"block_{block}/"))
    out = nnx.jit(lambda m, x: m(x))(module, jnp.asarray(golden[f"block_{block}/in"].transpose(0, 2, 3, 1)))
    out = out[0] if isinstance(out, tuple) else out  # InceptionC also returns its 1x1 branch
    want = golden[f"block_{block}/out"]
    assert rel_err(np.asarray(out).transpose(0, 3, 1, 2), want) <= 1e-5


def test_tf1_resize_matches_tensorflow(golden):
    x = jnp.asarray(golden["tf1_resize_in_u8"].astype(np.float32))
    got = np.asarray(inc.resize_bilinear(x, 299, "tf1"))
    # README: a float32 numpy version of the same formula matches TF to 2.1e-5 on the 0..255 scale.
    assert_close(got, golden["tf1_resize_out"], 1e-7)  # of max 255: 2.6e-5, the README's 2.1e-5 rounded up
    # The half-pixel resize is a different function (up to 15.4 levels apart on this image).
    torch_style = np.asarray(inc.resize_bilinear(x, 299, "torch"))
    assert np.max(np.abs(torch_style - golden["tf1_resize_out"])) > 10


def test_tf1_preprocess_is_adm_normalisation(golden):
    u8 = np.repeat(golden["tf1_resize_in_u8"], 3, axis=-1)
    got = np.asarray(inc.preprocess(jnp.asarray(u8), resize="tf1"))
    want = (golden["tf1_resize_out"] - 128.0) / 128.0
    for c in range(3):
        assert_close(got[..., c : c + 1], want, 2e-7)  # the same bound after (x − 128) / 128


def test_sharded_padded_extractor_matches_golden(model, golden):
    """8 fake devices, a global batch of 8 holding the 2 golden images and 6 zero rows of padding."""
    extractor = InceptionExtractor(model, batch_size=8, resize="torch")
    assert extractor.batch_size == 8 and extractor.mesh.devices.size == 8
    feats = extractor(ArrayImages(golden["net/images_u8"]))
    assert feats["pool"].shape == (2, 2048) and feats["spatial"].shape == (2, 2023)
    assert rel_err(feats["pool"], golden["net/pool3"]) <= 1e-5
    assert rel_err(feats["spatial"], golden["net/spatial_sfid"]) <= 1e-5
    logits = golden["net/logits_nobias"].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert rel_err(feats["probs"], probs) <= 1e-5


def test_converter_reports_every_problem(golden):
    weights = regenerate_weights(golden, "block_A/")
    del weights["branch1x1.bn.running_var"]
    weights["branch5x5_2.conv.weight"] = weights["branch5x5_2.conv.weight"][:, :, :3, :3]
    weights["AuxLogits.fc.weight"] = np.zeros((2, 2), np.float32)
    weights["branch_pool.bn.num_batches_tracked"] = np.zeros((), np.int64)  # ignored, as in torch eval mode
    with pytest.raises(ConversionError) as err:
        load_into(inc.InceptionA(192, pool_features=32, rngs=nnx.Rngs(0)), weights, source="bad.pth")
    message = str(err.value)
    for needle in ("bad.pth", "branch1x1.bn.running_var", "branch5x5_2.conv.weight", "AuxLogits.fc.weight"):
        assert needle in message
    assert "num_batches_tracked" not in message


def test_preprocess_rejects_bad_images():
    with pytest.raises(ValueError, match="uint8"):
        inc.preprocess(jnp.zeros((1, 8, 8, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        inc.preprocess(jnp.zeros((1, 3, 8, 8), jnp.uint8))
    with pytest.raises(ValueError, match="resize"):
        inc.preprocess(jnp.zeros((1, 8, 8, 3), jnp.uint8), resize="bicubic")
