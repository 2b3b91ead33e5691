"""Reference (PyTorch) checkpoint ↔ sfd_jax parameter converters. See `sfd_jax.convert.official`."""
