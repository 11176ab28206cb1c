r"""MoE MLP: per-sample expert gather (ours) vs. running every expert and masking (reference).

The reference computes all E experts on the whole batch and multiplies by a one-hot mask
(spec §2.1); `posebh_jax.models.vit_moe.MoEMlp` gathers each sample's expert weights and runs one
expert matmul per sample, with the gather's gradient as a one-hot contraction
(`vit_moe.take_experts`) rather than plain indexing's scatter-add (also timed: "scatter-add
gradient"). All are timed forward+backward, jitted, in one process run, and the ratios are
printed, after checking that the kernel gradients agree. On CPU only the ratios are meaningful.

  python benchmarks/moe_expert_gather.py [--batch 16 --tokens 192 --dim 384 --experts 6]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from posebh_jax.models.vit_moe import take_experts


def gathered(h, kernel, bias, idx):
  """h [B,N,4D], kernel [E,4D,P], bias [E,P], idx [B] → [B,N,P]: one expert per sample (ours)."""
  return (jnp.einsum("bnh,bhp->bnp", h, take_experts(kernel, idx))
          + take_experts(bias, idx)[:, None, :])


def gathered_scatter(h, kernel, bias, idx):
  """The same with plain indexing, whose gradient is a scatter-add (before)."""
  return jnp.einsum("bnh,bhp->bnp", h, kernel[idx]) + bias[idx][:, None, :]


def masked_all(h, kernel, bias, idx):
  """The reference's formulation: every expert on every sample, then a one-hot mask."""
  out = jnp.einsum("bnh,ehp->ebnp", h, kernel) + bias[:, None, None, :]
  mask = jax.nn.one_hot(idx, kernel.shape[0], dtype=h.dtype).T[:, :, None, None]  # [E,B,1,1]
  return jnp.sum(out * mask, axis=0)


def kernel_grad(fn):
  """jit(d/dkernel sum(fn(h, kernel, bias, idx)^2)), called as (kernel, h, bias, idx)."""
  return jax.jit(jax.grad(lambda k, *a: jnp.sum(fn(a[0], k, *a[1:]) ** 2)))


def time_fn(fn, *args, repeats: int = 10) -> float:
  loss = kernel_grad(fn)
  jax.block_until_ready(loss(args[1], args[0], *args[2:]))  # Compile.
  t = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(loss(args[1], args[0], *args[2:]))
  return (time.perf_counter() - t) / repeats


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--tokens", type=int, default=192)
  p.add_argument("--dim", type=int, default=384)
  p.add_argument("--experts", type=int, default=6)
  p.add_argument("--part", type=int, default=96)
  a = p.parse_args()
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k1, (a.batch, a.tokens, 4 * a.dim))
  kernel = 0.02 * jax.random.normal(k2, (a.experts, 4 * a.dim, a.part))
  bias = jnp.zeros((a.experts, a.part))
  idx = jax.random.randint(k3, (a.batch,), 0, a.experts)
  diff = jnp.max(jnp.abs(gathered(h, kernel, bias, idx) - masked_all(h, kernel, bias, idx)))
  grads = [kernel_grad(f)(kernel, h, bias, idx) for f in (gathered, gathered_scatter, masked_all)]
  gdiff = max(float(jnp.max(jnp.abs(grads[0] - g)) / jnp.max(jnp.abs(g))) for g in grads[1:])
  t_g = time_fn(gathered, h, kernel, bias, idx)
  t_s = time_fn(gathered_scatter, h, kernel, bias, idx)
  t_m = time_fn(masked_all, h, kernel, bias, idx)
  print(f"device: {jax.devices()[0].device_kind}; batch {a.batch}, tokens {a.tokens}, "
        f"hidden {4 * a.dim}, experts {a.experts}, part {a.part}; max |diff| {float(diff):.2e}; "
        f"kernel gradients: max relative diff {gdiff:.2e}")
  print(f"gathered expert (ours):   {t_g * 1e3:8.2f} ms  (fwd+bwd)")
  print(f"  scatter-add gradient:   {t_s * 1e3:8.2f} ms  (fwd+bwd; plain indexing, before)")
  print(f"all experts + mask (ref): {t_m * 1e3:8.2f} ms  (fwd+bwd)")
  print(f"speed-up of ours: {t_m / t_g:.2f}x over the reference's, {t_s / t_g:.2f}x over the "
        f"scatter-add gradient")


if __name__ == "__main__":
  main()
