"""Reference (PyTorch) checkpoint <-> sfd_jax parameter converters: one module per model (dit, semvae, texture_vae,
dinov2), each with its `load_*` / `export_*`."""
