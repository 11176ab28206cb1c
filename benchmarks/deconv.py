r"""The heads' 2x-upsampling transposed conv: four formulations, forward + both gradients.

Times one `ConvTranspose2d(k=4, stride=2, padding=1)` layer of PoseBH-B's heads (768→256 on the
16×12 backbone grid, then 256→256 on 32×24), forward and backward with respect to the input and
the kernel, as the train step needs them, in one process:

  lax          `lax.conv_transpose(transpose_kernel=True)`: the dilated-input conv (the old layer).
  subpixel4    four stride-1 2×2 convs on the undilated input, one per output parity, interleaved.
  subpixel1    one stride-1 2×2 conv with 4·C_out outputs (all parities), then depth-to-space.
  matmul       `heads.conv_transpose_2x`: one GEMM x·W[C_in, 16·C_out], then overlap-add
               (PyTorch's col2im formulation; what the heads use: the fastest here).

Each row prints the median time and the largest difference of the gradients from the first
implementation's, relative to their largest magnitude.

  python benchmarks/deconv.py --batch=2
  python benchmarks/deconv.py --batch=8 --impls=matmul,subpixel4   # skip the slow ones
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from posebh_jax.models import heads


def lax_conv_transpose(x: jax.Array, kernel: jax.Array, padding: int,
                       output_padding: int) -> jax.Array:
  """The previous layer: flax `nn.ConvTranspose(transpose_kernel=True)` with PyTorch padding."""
  k = kernel.shape[0]
  pad = (k - 1 - padding, k - 1 - padding + output_padding)
  return jax.lax.conv_transpose(x, kernel, (2, 2), (pad, pad), transpose_kernel=True,
                                dimension_numbers=("NHWC", "HWIO", "NHWC"))


def subpixel4_conv_transpose(x: jax.Array, kernel: jax.Array, padding: int,
                             output_padding: int) -> jax.Array:
  """Four stride-1 2×2 convs (one per output parity, k=4, p=1 only) on the undilated input."""
  assert kernel.shape[0] == 4 and padding == 1 and output_padding == 0
  b, h, w, _ = x.shape
  c_out = kernel.shape[2]
  # Output row 2m + r takes x[m - 1] K[3], x[m] K[1] (r=0) or x[m] K[2], x[m + 1] K[0] (r=1).
  taps = {0: ((1, 0), (3, 1)), 1: ((0, 1), (2, 0))}  # Padding, then conv taps (flipped kh).
  outs = []
  for r in (0, 1):
    for c in (0, 1):
      (pr, kr), (pc, kc) = taps[r], taps[c]
      sub = kernel[jnp.array(kr)][:, jnp.array(kc)].transpose(0, 1, 3, 2)  # [2, 2, C_in, C_out]
      outs.append(jax.lax.conv_general_dilated(x, sub, (1, 1), (pr, pc),
                                               dimension_numbers=("NHWC", "HWIO", "NHWC")))
  y = jnp.stack(outs, 3).reshape(b, h, w, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, 2 * h, 2 * w, c_out)


def subpixel_kernel(kernel: jax.Array) -> jax.Array:
  """Rearranges a stride-2 transposed-conv kernel into the equivalent stride-1 conv's kernel.

  Output pixel `2m + r` (full, uncropped indexing) of a stride-2 transposed conv receives
  `x[m - q] * K[2q + r]` for every tap `q < Q = ceil(k / 2)`: each output parity `(r, c)` is a
  stride-1 `Q x Q` conv over the *undilated* input, and all four parities share one window, so
  one conv with `4 * C_out` output channels computes them all (depth-to-space interleaves them).

  Args:
    kernel: `[k, k, C_out, C_in]`, the PyTorch weight `[C_in, C_out, k, k]` permuted (the layout
      the checkpoints are converted to).

  Returns:
    `[Q, Q, C_in, 4 * C_out]` HWIO kernel; the output channels are ordered `(r, c, C_out)`.
  """
  k, _, c_out, c_in = kernel.shape
  q = -(-k // 2)
  kernel = jnp.pad(kernel, ((0, 2 * q - k), (0, 2 * q - k), (0, 0), (0, 0)))  # Taps >= k are 0.
  kernel = kernel.reshape(q, 2, q, 2, c_out, c_in)  # (q, r, s, c, o, i): kh = 2q + r.
  # The conv correlates xpad[m + t] (pad Q - 1 before) with tap t, i.e. x[m - q] at t = Q - 1 - q.
  kernel = kernel[::-1, :, ::-1]
  return kernel.transpose(0, 2, 5, 1, 3, 4).reshape(q, q, c_in, 4 * c_out)


def subpixel_one_conv(x: jax.Array, kernel: jax.Array, padding: int,
                      output_padding: int) -> jax.Array:
  """One stride-1 `Q x Q` conv with `4 * C_out` outputs (all parities), then depth-to-space."""
  b, h, w, _ = x.shape
  k, _, c_out, _ = kernel.shape
  q = -(-k // 2)
  y = jax.lax.conv_general_dilated(
      x, subpixel_kernel(kernel), window_strides=(1, 1),
      padding=((q - 1, q - 1), (q - 1, q - 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  hq, wq = h + q - 1, w + q - 1
  y = y.reshape(b, hq, wq, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * hq, 2 * wq,
                                                                             c_out)
  ho = 2 * (h - 1) - 2 * padding + k + output_padding
  wo = 2 * (w - 1) - 2 * padding + k + output_padding
  return y[:, padding:padding + ho, padding:padding + wo]


IMPLS = dict(lax=lax_conv_transpose, subpixel4=subpixel4_conv_transpose,
             subpixel1=subpixel_one_conv, matmul=heads.conv_transpose_2x)


def _fwd_bwd(impl):
  def loss(x, kernel, cot):
    return jnp.vdot(impl(x, kernel, 1, 0), cot)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--impls", default="lax,subpixel4,subpixel1,matmul")
  a = p.parse_args()
  rs = np.random.RandomState(0)
  print(f"device: {jax.devices()[0].device_kind}; batch {a.batch}; forward + d/dx + d/dkernel, "
        f"median of {a.repeats}")
  for c_in, c_out, h, w in ((768, 256, 16, 12), (256, 256, 32, 24)):
    x = jnp.asarray(rs.randn(a.batch, h, w, c_in), jnp.float32)
    kernel = jnp.asarray(rs.randn(4, 4, c_out, c_in) * 0.01, jnp.float32)
    cot = jnp.asarray(rs.randn(a.batch, 2 * h, 2 * w, c_out), jnp.float32)
    row, ref = [], None
    for name in a.impls.split(","):
      fn = _fwd_bwd(IMPLS[name])
      g = jax.block_until_ready(fn(x, kernel, cot))
      if ref is None:
        ref = g
      err = max(float(jnp.abs(u - v).max() / jnp.abs(v).max()) for u, v in zip(g, ref))
      ts = []
      for _ in range(a.repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(x, kernel, cot))
        ts.append(time.perf_counter() - t)
      row.append(f"{name} {statistics.median(ts) * 1e3:8.1f} ms (rel. err {err:.1e})")
    print(f"{c_in:4d}->{c_out} {h}x{w}:  " + "   ".join(row))


if __name__ == "__main__":
  main()
