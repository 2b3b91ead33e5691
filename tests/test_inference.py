"""The notebook API end to end on tiny random weights: `python -m sfd_jax.convert bundle` from reference-format
files (the golden tiny DiT .pt and its guide, a random f2d32 texture-VAE .ckpt, latent-stats .pt files), then the
README's snippet exactly as written (bundle path substituted), checked against the generator called directly on the
original files."""

import contextlib
import dataclasses
import io
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

import sfd_jax
from conftest import OFFICIAL, REPO, load_golden
from sfd_jax.convert.__main__ import main as convert_main
from sfd_jax.convert.dit import load_dit
from sfd_jax.convert.texture_vae import export_texture_vae, load_texture_vae
from sfd_jax.diffusion.guidance import AutoGuidance
from sfd_jax.eval.generator import ImageGenerator, SamplerSettings, TextureDecoder
from sfd_jax.inference import SFDPipeline, check_guide
from sfd_jax.models.texture_vae import TextureVAE, TextureVAEConfig
from test_extract import numpy_init

README_BUNDLE = "weights/sfd_xl_bundle"


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("reference")
    guide = {k[9:]: torch.from_numpy(v.copy()) for k, v in load_golden("dit.npz").items() if k.startswith("guide_sd/")}
    torch.save(guide, root / "guide.pt")  # a bare state dict, as a guide checkpoint may be
    # f2d32 with 32 channels (GroupNorm 32, as in the reference): 16×16×32 texture latents → 32×32 images.
    cfg = TextureVAEConfig(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=32, z_channels=32, embed_dim=32
    )
    vae = numpy_init(lambda: TextureVAE(cfg, rngs=nnx.Rngs(3)), 3)  # host-random weights: an eager init compiled ~5 s
    sd = {k: torch.from_numpy(np.array(v)) for k, v in export_texture_vae(vae).items()}
    torch.save({"global_step": 1, "state_dict": sd}, root / "vae.ckpt")
    rng = np.random.default_rng(0)
    for name, c in (("latents_stats.pt", 32), ("latents_sv_stats.pt", 16)):
        torch.save(
            {
                "mean": torch.from_numpy(0.1 * rng.standard_normal((1, c, 1, 1)).astype(np.float32)),
                "std": torch.from_numpy((1 + 0.2 * rng.random((1, c, 1, 1))).astype(np.float32)),
            },
            root / name,
        )
    return root


@pytest.fixture(scope="module")
def bundle(reference_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "tiny_bundle"
    r = reference_files
    code = convert_main(
        [
            "bundle",
            str(out),
            "--dit",
            str(OFFICIAL / "dit_official_format.pt"),
            "--guide",
            str(r / "guide.pt"),
            "--texture-vae",
            str(r / "vae.ckpt"),
            "--stats",
            str(r / "latents_stats.pt"),
            "--semantic-stats",
            str(r / "latents_sv_stats.pt"),
        ]
    )
    assert code == 0
    return out


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Inference in a notebook") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_bundle_layout(bundle, reference_files):
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["format"] == "sfd_jax.bundle.v1" and manifest["guide"] == "guide"
    assert {p.name for p in bundle.iterdir()} == {"dit", "guide", "texture_vae", "stats.json", "bundle.json"}
    assert not bundle.with_name("tiny_bundle.partial").exists()
    import torch

    stats = json.loads((bundle / "stats.json").read_text())
    ref = torch.load(reference_files / "latents_stats.pt")
    np.testing.assert_array_equal(np.float32(stats["texture"]["mean"]), ref["mean"].numpy().reshape(-1))
    np.testing.assert_array_equal(np.float32(stats["texture"]["std"]), ref["std"].numpy().reshape(-1))
    assert stats["semantic"]["channels"] == 16


def test_readme_snippet_runs_and_matches_the_generator(bundle, reference_files):
    snippet = readme_snippet()
    assert README_BUNDLE in snippet
    out = io.StringIO()
    scope = {}
    with contextlib.redirect_stdout(out):
        exec(snippet.replace(README_BUNDLE, str(bundle)), scope)  # noqa: S102 - the README's own code
    printed = out.getvalue().strip()
    print("\nREADME snippet printed:", printed)
    assert printed == "(4, 32, 32, 3) uint8"
    images = scope["images"]

    # The same images from the original reference files through the generator directly (the bundle's conversion
    # and the pipeline's defaults: Dopri5 1e-3/1e-6, Δt 0.3, AutoGuidance w 1.5, image i = noise index i, seed 0).
    _, model = load_dit(str(OFFICIAL / "dit_official_format.pt"))
    _, guide = load_dit(str(reference_files / "guide.pt"))
    _, vae = load_texture_vae(reference_files / "vae.ckpt")
    import torch

    stats = torch.load(reference_files / "latents_stats.pt")
    decoder = TextureDecoder(vae, stats["mean"].numpy().reshape(-1), stats["std"].numpy().reshape(-1))
    gen = ImageGenerator(decoder, settings=SamplerSettings(), seed=0, per_device_batch=-(-4 // jax.device_count()))
    direct, _ = gen(model, np.arange(4), np.array([207, 360, 387, 974]), guidance=AutoGuidance(guide, 1.5))
    np.testing.assert_array_equal(images, direct)
    assert len({im.tobytes() for im in images}) == 4

    pipe = scope["pipe"]
    assert sfd_jax.SFDPipeline is SFDPipeline and isinstance(pipe, SFDPipeline)
    unguided = pipe([207, 360, 387, 974], guidance="none", seed=0)
    assert unguided.shape == images.shape and not np.array_equal(unguided, images)


def test_clear_errors(bundle):
    pipe = SFDPipeline.from_pretrained(bundle)
    with pytest.raises(ValueError, match=r"class ids \[1000\] are out of range.*1000 classes"):
        pipe([3, 1000])
    with pytest.raises(ValueError, match="class_ids must be"):
        pipe([0.5])
    with pytest.raises(ValueError, match="guidance must be one of"):
        pipe([3], guidance="classifier")
    no_guide = SFDPipeline(pipe.model, pipe.decoder)
    assert no_guide.defaults["guidance"] == "cfg"
    with pytest.raises(ValueError, match="needs a guide model"):
        no_guide([3], guidance="autoguidance")
    other = dataclasses.replace(pipe.model.cfg, num_classes=10)
    with pytest.raises(ValueError, match="num_classes 1000 \\(model\\) vs 10 \\(guide\\)"):
        check_guide(pipe.model.cfg, other)
    with pytest.raises(FileNotFoundError, match="not an SFD bundle"):
        SFDPipeline.from_pretrained(bundle / "dit")
    with pytest.raises(SystemExit, match="not empty"):
        convert_main(["bundle", str(bundle), "--dit", "x.pt", "--texture-vae", "v.ckpt", "--stats", "s.pt"])
