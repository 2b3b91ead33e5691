"""sfd_jax vs PyTorch (CPU), same DiT + REPA projector, same weights and inputs, in one process; prints one JSON.

    python benchmarks/torch_compare.py                  # depth 4, width 256, 4 heads, batch 8, 16×16×48 latents
    python benchmarks/torch_compare.py --size=b

The PyTorch side is written here from the architecture (dual-timestep LightningDiT: adaLN-Zero blocks, qk
RMSNorm, 2-D RoPE with interleaved pairs, SwiGLU, REPA projector after block `repa_depth`), as plain functions of
a dict of tensors; the weights are exported from the Flax model (kernel (in, out) → torch's (out, in) layout).
Both sides time the same objective on the same inputs: mean((v − u)²) + mean(1 − cos(proj, dino)). Reported:
forward and forward + backward times of each (median of rounds, interleaved jax/torch, with the 2048² fp32 matmul
peak of each framework in the same run), `jax_speedup_fwdbwd` = torch time ÷ jax time, and the largest relative
difference of the outputs and of the parameter gradients (max |a − b| / max |a| per tensor), which shows that both
sides compute the same thing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from common import emit, environment, log, matmul_peak, random_dit


def torch_model(w: dict, cfg):
    """Returns fn(x, t_tex, t_sem, y) -> (velocity (B,H,W,C), repa (B,T,F)) over the torch tensors in `w`."""
    import torch
    import torch.nn.functional as F

    def lin(x, name):
        return F.linear(x, w[f"{name}.kernel"], w[f"{name}.bias"])

    def rms(x, name, eps=1e-6):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[f"{name}.weight"]

    def sinus(t, dim=256):
        half = dim // 2
        freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        a = t[:, None] * freqs[None]
        return torch.cat([torch.cos(a), torch.sin(a)], -1)

    def temb(t, name):
        return lin(F.silu(lin(sinus(t), f"{name}.fc1")), f"{name}.fc2")

    def rope(x, cos, sin):  # x (B, heads, T, hd); pairs (2m, 2m+1) -> (-x_{2m+1}, x_{2m})
        pairs = x.unflatten(-1, (-1, 2))
        rot = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
        return x * cos + rot * sin

    heads, d = cfg.num_heads, cfg.hidden_size
    hd = d // heads

    def block(x, c, i):
        p = f"blocks.{i}"
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), f"{p}.adaLN_modulation").chunk(6, -1)
        b, t, _ = x.shape
        h = rms(x, f"{p}.norm1") * (1 + sc1[:, None]) + sh1[:, None]
        qkv = lin(h, f"{p}.attn.qkv").view(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q = rope(rms(qkv[0], f"{p}.attn.q_norm"), w["rope_cos"], w["rope_sin"])
        k = rope(rms(qkv[1], f"{p}.attn.k_norm"), w["rope_cos"], w["rope_sin"])
        a = F.scaled_dot_product_attention(q, k, qkv[2]).transpose(1, 2).reshape(b, t, d)
        x = x + g1[:, None] * lin(a, f"{p}.attn.proj")
        h = rms(x, f"{p}.norm2") * (1 + sc2[:, None]) + sh2[:, None]
        gate, value = lin(h, f"{p}.mlp.w12").chunk(2, -1)
        return x + g2[:, None] * lin(F.silu(gate) * value, f"{p}.mlp.w3")

    def forward(x, t_tex, t_sem, y):
        b, hh, ww, ch = x.shape
        h = lin(x.reshape(b, hh * ww, ch), "x_embedder") + w["pos_embed"][None]
        c = torch.cat([temb(t_sem, "t_embedder_sem"), temb(t_tex, "t_embedder_tex")], -1)
        c = c + w["y_embedder.embedding_table"][y]
        repa = None
        for i in range(cfg.depth):
            h = block(h, c, i)
            if i + 1 == cfg.repa_depth:
                r = "repa_projector"
                repa = lin(F.silu(lin(F.silu(lin(h, f"{r}.fc1")), f"{r}.fc2")), f"{r}.fc3")
        sh, sc = lin(F.silu(c), "final_layer.adaLN_modulation").chunk(2, -1)
        out = lin(rms(h, "final_layer.norm_final") * (1 + sc[:, None]) + sh[:, None], "final_layer.linear")
        return out.reshape(b, hh, ww, ch), repa

    return forward


def objective(v, u, proj, dino, xp):
    """mean((v − u)²) + mean(1 − cos(proj, dino)); xp is jax.numpy or torch (same arithmetic)."""
    if xp.__name__ == "torch":
        import torch.nn.functional as F

        cos = F.cosine_similarity(proj, dino, dim=-1, eps=1e-8)
    else:
        num = (proj * dino).sum(-1)
        den = xp.maximum(xp.linalg.norm(proj, axis=-1) * xp.linalg.norm(dino, axis=-1), 1e-8)
        cos = num / den
    return ((v - u) ** 2).mean() + (1 - cos).mean()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="d4w256", help="d4w256 (depth 4, width 256, 4 heads) or a DiT size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iters", type=int, default=2)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from sfd_jax.models.lightningdit import DiTConfig, forward_flops_per_image

    cfg = DiTConfig(depth=4, hidden_size=256, num_heads=4) if args.size == "d4w256" else DiTConfig.from_size(args.size)
    graphdef, params, rest = nnx.split(random_dit(cfg, 0), nnx.Param, ...)  # every weight carries signal

    b, s = args.batch, cfg.input_size
    r = np.random.default_rng(0)
    x = r.standard_normal((b, s, s, cfg.in_channels), np.float32)
    u = r.standard_normal(x.shape, np.float32)
    dino = r.standard_normal((b, cfg.num_tokens, cfg.repa_dim), np.float32)
    t_tex, t_sem = r.uniform(size=b).astype(np.float32), r.uniform(size=b).astype(np.float32)
    y = r.integers(0, cfg.num_classes, b).astype(np.int32)

    def jloss(params, x, u, dino, t_tex, t_sem, y):
        v, proj = nnx.merge(graphdef, params, rest)(x, t_tex, t_sem, y, train=True)
        return objective(v, u, proj, dino, jnp)

    jin = [jnp.asarray(a) for a in (x, u, dino, t_tex, t_sem, y)]
    jfwd = jax.jit(jloss)
    jfb = jax.jit(jax.value_and_grad(jloss))

    names = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.merge_state(params, rest))}
    tw = {}
    for name, var in names.items():
        a = np.asarray(var.get_value() if hasattr(var, "get_value") else var.value)
        if name.endswith(".kernel"):
            a = a.T  # torch layout (out, in)
        tw[name] = torch.tensor(
            np.ascontiguousarray(a), requires_grad=name not in ("pos_embed", "rope_cos", "rope_sin")
        )
    tfwd_fn = torch_model(tw, cfg)
    tin = [torch.from_numpy(a) for a in (x, u, dino, t_tex, t_sem)] + [torch.from_numpy(y.astype(np.int64))]

    def tloss():
        v, proj = tfwd_fn(tin[0], tin[3], tin[4], tin[5])
        return objective(v, tin[1], proj, tin[2], torch)

    def t_fwd():
        with torch.no_grad():
            return tloss()

    def t_fb():
        for v in tw.values():
            v.grad = None
        loss = tloss()
        loss.backward()
        return loss

    # Agreement: outputs and every parameter gradient.
    jv, jp = nnx.merge(graphdef, params, rest)(*[jin[0], jin[3], jin[4], jin[5]], train=True)
    with torch.no_grad():
        tv, tp = tfwd_fn(tin[0], tin[3], tin[4], tin[5])
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(np.asarray(a))), 1e-30))  # noqa
    _, jg = jfb(params, *jin)
    t_fb()
    jg_flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(jg)}
    grad_rel = {}
    for name, g in jg_flat.items():
        ga = np.asarray(g.get_value() if hasattr(g, "get_value") else g.value)
        tg = tw[name].grad.numpy()
        grad_rel[name] = rel(ga, tg.T if name.endswith(".kernel") else tg)
    agree = {
        "velocity_max_rel": rel(jv, tv.numpy()),
        "repa_max_rel": rel(jp, tp.numpy()),
        "loss_jax": float(jfwd(params, *jin)),
        "loss_torch": float(t_fwd()),
        "grad_max_rel": max(grad_rel.values()),
        "grad_max_rel_param": max(grad_rel, key=grad_rel.get),
    }
    log(f"[torch_compare] agreement {agree}")

    def clock(fn, n):
        w, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            out = fn()
        if not isinstance(out, torch.Tensor):
            jax.block_until_ready(out)
        return (time.perf_counter() - w) / n, (time.process_time() - c) / n

    def torch_peak(n=2048, chain=4, repeats=3):
        a, m = torch.randn(n, n), torch.randn(n, n) / n**0.5
        ts = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            h = a
            for _ in range(chain):
                h = h @ m
            ts.append(time.perf_counter() - t)
        return 2.0 * n**3 * chain / statistics.median(ts[1:])

    fns = {
        "jax_fwd": lambda: jfwd(params, *jin),
        "jax_fwdbwd": lambda: jfb(params, *jin),
        "torch_fwd": t_fwd,
        "torch_fwdbwd": t_fb,
    }
    for f in fns.values():
        clock(f, 1)
    matmul_peak("float32", repeats=1)
    rounds = []
    for i in range(args.rounds):
        row = {
            "jax_peak_flops_per_s": matmul_peak("float32", repeats=3)["flops_per_s_median"],
            "torch_peak_flops_per_s": torch_peak(),
        }
        order = list(fns) if i % 2 == 0 else list(fns)[2:] + list(fns)[:2]  # A B / B A
        for k in order:
            row[k + "_s"], row[k + "_cpu_s"] = clock(fns[k], args.iters)
        rounds.append(row)
        log(f"[torch_compare] round {i}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    flops_fwd = forward_flops_per_image(cfg, include_repa=True) * b
    result = {
        "benchmark": "torch_compare",
        "size": args.size,
        "batch": b,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "median": med,
        "rounds": rounds,
        "jax_speedup_fwd": med["torch_fwd_s"] / med["jax_fwd_s"],
        "jax_speedup_fwdbwd": med["torch_fwdbwd_s"] / med["jax_fwdbwd_s"],
        "jax_speedup_fwdbwd_cpu": med["torch_fwdbwd_cpu_s"] / med["jax_fwdbwd_cpu_s"],
        "jax_speedup_fwdbwd_per_round": [r["torch_fwdbwd_s"] / r["jax_fwdbwd_s"] for r in rounds],
        "bwd_over_fwd_jax": (med["jax_fwdbwd_s"] - med["jax_fwd_s"]) / med["jax_fwd_s"],
        "bwd_over_fwd_torch": (med["torch_fwdbwd_s"] - med["torch_fwd_s"]) / med["torch_fwd_s"],
        "flops_fwd": flops_fwd,
        "agreement": agree,
        "env": environment(),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
