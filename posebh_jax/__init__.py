"""posebh-jax: PoseBH in JAX."""
