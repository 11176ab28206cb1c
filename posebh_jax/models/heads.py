"""Heatmap heads (spec §2.2) and the prototype embedding head (spec §2.3).

Inputs are NHWC backbone features `[B, Hp, Wp, D]`. Module names mirror the PyTorch
state_dict: `deconv_layers_{3i}` (transposed conv) / `deconv_layers_{3i+1}` (BatchNorm),
`final_layer`, and for the prototype head `neck/{conv1,bn1,conv2,bn2,downsample_0,downsample_1}`
and `head_{0,1,3}` (index 2 is the parameter-free SiLU, as in the reference nn.Sequential).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# mmpose normal_init(std=0.001) / constant_init(1, 0): used for every conv, deconv and BN here.
_head_init = nn.initializers.normal(stddev=0.001)

BN_MOMENTUM = 0.9  # PyTorch momentum 0.1 on the new statistic == flax decay 0.9 on the old one.
BN_EPS = 1e-5


def deconv_padding(kernel: int) -> tuple[int, int]:
  """PyTorch (padding, output_padding) mmpose uses for a stride-2 deconv of this kernel size.

  Every choice doubles the spatial size (mmpose `_get_deconv_cfg`).
  """
  if kernel == 4:
    return 1, 0
  if kernel == 3:
    return 1, 1
  if kernel == 2:
    return 0, 0
  raise ValueError(f"unsupported deconv kernel size {kernel} (expected 2, 3 or 4)")


def conv_transpose_2x(x: jax.Array, kernel: jax.Array, padding: int,
                      output_padding: int) -> jax.Array:
  """PyTorch `ConvTranspose2d(stride=2, padding, output_padding, bias=False)` as GEMM + col2im.

  Equal (to float rounding) to `lax.conv_transpose(x, kernel, (2, 2), ..., transpose_kernel=True)`
  with PyTorch's padding, but computed as PyTorch does: one matmul `x · W[C_in, k·k·C_out]` per
  input pixel, then overlap-add of the `k x k` patches into the stride-2 output. XLA:CPU runs the
  dilated conv's kernel gradient on a slow generic path (issue 19: 20 s of a 22 s step); here
  both gradients are plain matmuls (`benchmarks/deconv.py` times the alternatives).

  Args:
    x: `[B, H, W, C_in]`.
    kernel: `[k, k, C_out, C_in]`, the PyTorch weight `[C_in, C_out, k, k]` permuted.
    padding: PyTorch `padding` p (cropped from both sides of the full output).
    output_padding: PyTorch `output_padding` op (extra rows/columns at the end).

  Returns:
    `[B, 2(H-1) - 2p + k + op, 2(W-1) - 2p + k + op, C_out]`.
  """
  b, h, w, c_in = x.shape
  k, _, c_out, _ = kernel.shape
  q = -(-k // 2)  # Taps per output parity: kernel row kh = 2 qi + r feeds full row 2 (i + qi) + r.
  kernel = jnp.pad(kernel, ((0, 2 * q - k), (0, 2 * q - k), (0, 0), (0, 0)))  # Taps >= k are 0.
  wmat = kernel.transpose(3, 0, 1, 2).reshape(c_in, 4 * q * q * c_out)
  patches = (x.reshape(b * h * w, c_in) @ wmat).reshape(b, h, w, q, 2, q, 2, c_out)
  # Overlap-add: full[2m + r, 2n + c] = sum_{qi, qj} patches[m - qi, n - qj, qi, r, qj, c].
  full = 0.
  for qi in range(q):
    for qj in range(q):
      full = full + jnp.pad(patches[:, :, :, qi, :, qj],
                            ((0, 0), (qi, q - 1 - qi), (qj, q - 1 - qj), (0, 0), (0, 0), (0, 0)))
  hq, wq = h + q - 1, w + q - 1
  full = full.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * hq, 2 * wq, c_out)
  ho = 2 * (h - 1) - 2 * padding + k + output_padding
  wo = 2 * (w - 1) - 2 * padding + k + output_padding
  # Rows past the full output (output_padding) are zero in `full` already: no tap reaches them.
  return full[:, padding:padding + ho, padding:padding + wo]


class TorchConvTranspose(nn.Module):
  """PyTorch `ConvTranspose2d(stride=2, bias=False)` in NHWC with the mmpose padding for `k`.

  The parameter is `kernel` `[k, k, C_out, C_in]`, the name, shape, layout and initialiser flax's
  `nn.ConvTranspose(transpose_kernel=True)` used, so converted checkpoints and seeded inits are
  unchanged; only the computation differs (`conv_transpose_2x`).

  Attributes:
    features: output channels C_out.
    kernel_size: k (4 in PoseBH; 2 and 3 also supported, see `deconv_padding`).
    dtype: compute dtype.
  """
  features: int
  kernel_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, H, W, C_in]` -> `[B, 2H, 2W, features]`."""
    k = self.kernel_size
    p, op = deconv_padding(k)
    kernel = self.param("kernel", _head_init, (k, k, self.features, x.shape[-1]), jnp.float32)
    return conv_transpose_2x(x.astype(self.dtype), kernel.astype(self.dtype), p, op)


def torch_conv_transpose(features: int, kernel_size: int, name: str,
                         dtype: Dtype = jnp.float32) -> TorchConvTranspose:
  """PyTorch `ConvTranspose2d(stride=2, padding=p, output_padding=op, bias=False)` in NHWC.

  A PyTorch transposed conv is a stride-1 conv over the input dilated by the stride, padded by
  (k - 1 - p) before and (k - 1 - p + op) after, with the kernel flipped and in/out swapped
  (`lax.conv_transpose(transpose_kernel=True)`), so the flax kernel is the PyTorch weight
  `[C_in, C_out, kh, kw]` permuted to `[kh, kw, C_out, C_in]` (checked against a numpy scatter
  implementation and against `lax.conv_transpose` in tests/test_models.py). Maps
  `[B, H, W, C_in]` to `[B, 2H, 2W, features]`.
  """
  return TorchConvTranspose(features, kernel_size, dtype=dtype, name=name)


class GroupedBatchNorm(nn.Module):
  """BatchNorm whose training statistics are taken per group of consecutive batch rows.

  The batch `[B, ...]` is viewed as `[groups, B / groups, ...]` and each group is normalised with
  the mean and (biased) variance of its own rows (over rows and spatial positions, per
  channel), as `nn.BatchNorm` does for the whole batch. The batch is sharded contiguously over
  the mesh's batch axes (`data_pipelines.pipeline.batch_sharding`), so with `groups` = the
  number of batch shards each device normalises with the statistics of its own rows: the
  reference's per-GPU BatchNorm (no SyncBN). Because the grouping is by row, not by device, the
  result is a pure function of the config: 8 groups on 1 device equal 8 groups on 8 devices.

  Variables are those of `nn.BatchNorm` (`params/{scale, bias}` `[C]`, `batch_stats/{mean,
  var}` `[C]`), so checkpoints move freely between the two. The running statistics are updated
  with the mean over groups of the group means and of the group variances (the reference keeps
  one running estimate per GPU and saves rank 0's; the group average is the estimate of the
  same per-group quantities with less noise). Evaluation (`use_running_average`) is exactly
  `nn.BatchNorm`'s.

  Attributes:
    groups: number of row groups G; must divide the batch size.
    use_running_average: evaluation mode (running statistics, no update).
    momentum: decay of the running statistics (flax convention).
    epsilon: added to the variance.
    dtype: output dtype; statistics are computed in (at least) float32.
  """
  groups: int
  use_running_average: bool = False
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, ..., C]` -> `[B, ..., C]` normalised per group of `B / groups` rows."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
      xf = x.astype(stat_dtype)
    else:
      b = x.shape[0]
      if self.groups < 1 or b % self.groups:
        raise ValueError(f"BatchNorm groups={self.groups} must divide the batch size {b}")
      # [G, B/G, ..., C]: reshaping the contiguously sharded batch axis keeps each group's rows
      # on its device, so the reduction below needs no cross-device traffic when G is a
      # multiple of the shard count.
      xf = x.astype(stat_dtype).reshape((self.groups, b // self.groups) + x.shape[1:])
      axes = tuple(range(1, xf.ndim - 1))
      # Same formula as flax's BatchNorm (fast variance, clipped at 0).
      mean = xf.mean(axes, keepdims=True)
      var = jnp.maximum(0.0, jnp.square(xf).mean(axes, keepdims=True) - jnp.square(mean))
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(self.groups, c).mean(0)
        ra_var.value = m * ra_var.value + (1 - m) * var.reshape(self.groups, c).mean(0)
    y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.reshape(x.shape).astype(self.dtype)


def _batch_norm(train: bool, name: str, dtype: Dtype, groups: int = 1) -> nn.Module:
  """The heads' BatchNorm.

  groups == 1 (the default): global-batch statistics. Under jit (GSPMD) the mean and variance
  are reduced over the whole batch across every device, i.e. SyncBN. groups > 1:
  `GroupedBatchNorm`, statistics per group of `B / groups` consecutive rows; with groups = the
  number of batch shards (`mesh.data × mesh.fsdp`) that is per-device statistics, the
  reference's setting (per GPU, 128 samples, no SyncBN). Note: flax tracks the biased batch
  variance in `var`, PyTorch the unbiased one; the difference is n/(n-1) with n = rows·H·W.
  """
  if groups != 1:
    return GroupedBatchNorm(groups, use_running_average=not train, dtype=dtype, name=name)
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


def deconv_stack(x: jax.Array, filters: tuple[int, ...], kernels: tuple[int, ...], *,
                 train: bool, dtype: Dtype, bn_groups: int = 1) -> jax.Array:
  """`len(filters)` x [deconv (no bias) -> BN -> ReLU], each doubling the resolution.

  Must be called inside a compact module: the layers are named `deconv_layers_{3i}` /
  `deconv_layers_{3i+1}` directly under the caller, mirroring the PyTorch nn.Sequential indices
  (the ReLU sits at 3i+2).

  Args:
    x: `[B, H, W, C]`.
    filters: output channels of each deconv.
    kernels: kernel size of each deconv (4 in PoseBH).
    train: BN uses batch statistics (and updates `batch_stats`) when True.
    dtype: compute dtype.
    bn_groups: BatchNorm statistics groups (`_batch_norm`).

  Returns:
    `[B, H * 2^n, W * 2^n, filters[-1]]` (x unchanged when `filters` is empty).
  """
  if len(filters) != len(kernels):
    raise ValueError(f"deconv filters {filters} and kernels {kernels} differ in length")
  for i, (f, k) in enumerate(zip(filters, kernels)):
    x = torch_conv_transpose(f, k, f"deconv_layers_{3 * i}", dtype)(x)
    x = _batch_norm(train, f"deconv_layers_{3 * i + 1}", dtype, bn_groups)(x)
    x = nn.relu(x)
  return x


def _conv(features: int, kernel: int, name: str, dtype: Dtype, *, use_bias: bool = True) -> nn.Conv:
  """Conv2d with PyTorch 'same' padding k // 2 (odd kernels) and the heads' normal(0.001) init."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                 kernel_init=_head_init, bias_init=nn.initializers.zeros, dtype=dtype,
                 param_dtype=jnp.float32, name=name)


class HeatmapHead(nn.Module):
  """mmpose `TopdownHeatmapSimpleHead` (spec §2.2): deconvs -> BN -> ReLU, then a 1x1 conv.

  Attributes:
    num_keypoints: output channels K.
    deconv_filters: channels of each deconv ((256, 256) in PoseBH).
    deconv_kernels: kernel of each deconv ((4, 4) in PoseBH); defaults to 4 for every deconv.
    final_kernel: kernel of the final conv (1 in PoseBH; 3 also supported).
    dtype: compute dtype; the output is float32.
    bn_groups: BatchNorm statistics over the whole batch (1) or per group of rows
      (`_batch_norm`).
  """
  num_keypoints: int
  deconv_filters: tuple[int, ...] = (256, 256)
  deconv_kernels: tuple[int, ...] | None = None
  final_kernel: int = 1
  dtype: Dtype = jnp.float32
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Predicts heatmaps.

    Args:
      x: backbone features `[B, Hp, Wp, D]`.
      train: BN mode.

    Returns:
      Heatmaps `[B, K, Hh, Wh]` float32 (channel-first, as the targets), Hh = Hp * 2^n.
    """
    kernels = self.deconv_kernels or (4,) * len(self.deconv_filters)
    x = deconv_stack(x.astype(self.dtype), self.deconv_filters, kernels, train=train,
                     dtype=self.dtype, bn_groups=self.bn_groups)
    x = _conv(self.num_keypoints, self.final_kernel, "final_layer", self.dtype)(x)
    return jnp.transpose(x, (0, 3, 1, 2)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ProtoHeadConfig:
  """Prototype-head sizes; field names equal the `ProtoHead` module fields.

  Defaults are PoseBH (spec §1): deconvs (256, 256), channels 64, out_channels (E) 64.
  """
  deconv_filters: tuple[int, ...] = (256, 256)
  deconv_kernels: tuple[int, ...] | None = None
  channels: int = 64
  out_channels: int = 64
  head_kernel: int = 3


class ResBlock(nn.Module):
  """The 'res' neck: SiLU(BN(conv(SiLU(BN(conv(x))))) + BN(conv1x1(x)))."""
  features: int
  dtype: Dtype = jnp.float32
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """`[B, H, W, C]` -> `[B, H, W, features]`."""
    y = _conv(self.features, 3, "conv1", self.dtype)(x)
    y = nn.silu(_batch_norm(train, "bn1", self.dtype, self.bn_groups)(y))
    y = _conv(self.features, 3, "conv2", self.dtype)(y)
    y = _batch_norm(train, "bn2", self.dtype, self.bn_groups)(y)
    # The reference always builds the 1x1 downsample branch (in != out channels in PoseBH).
    r = _conv(self.features, 1, "downsample_0", self.dtype, use_bias=False)(x)
    r = _batch_norm(train, "downsample_1", self.dtype, self.bn_groups)(r)
    return nn.silu(y + r)


class ProtoHead(nn.Module):
  """Embedding network of `KptProtoHead` (spec §2.3); the prototypes themselves live elsewhere.

  Attributes:
    deconv_filters: channels of the head's own deconv stack.
    deconv_kernels: deconv kernels (default 4 each).
    channels: neck / head width (64 in PoseBH).
    out_channels: embedding dim E (64 in PoseBH).
    head_kernel: kernel of the first head conv (3).
    dtype: compute dtype; the embedding is returned in float32.
    bn_groups: BatchNorm statistics groups (`_batch_norm`).
  """
  deconv_filters: tuple[int, ...] = (256, 256)
  deconv_kernels: tuple[int, ...] | None = None
  channels: int = 64
  out_channels: int = 64
  head_kernel: int = 3
  dtype: Dtype = jnp.float32
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Computes the per-pixel embedding.

    Args:
      x: backbone features `[B, Hp, Wp, D]`.
      train: BN mode.

    Returns:
      Un-normalised embedding `[B, Hh, Wh, E]` float32.
    """
    kernels = self.deconv_kernels or (4,) * len(self.deconv_filters)
    x = deconv_stack(x.astype(self.dtype), self.deconv_filters, kernels, train=train,
                     dtype=self.dtype, bn_groups=self.bn_groups)
    x = ResBlock(self.channels, dtype=self.dtype, bn_groups=self.bn_groups,
                 name="neck")(x, train=train)
    x = _conv(self.channels, self.head_kernel, "head_0", self.dtype)(x)
    x = nn.silu(_batch_norm(train, "head_1", self.dtype, self.bn_groups)(x))
    x = _conv(self.out_channels, 1, "head_3", self.dtype)(x)
    return x.astype(jnp.float32)
