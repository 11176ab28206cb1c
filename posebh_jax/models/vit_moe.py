"""ViTMoE backbone (spec §2.1): a plain ViT whose FFN has a shared part plus per-dataset experts.

Layout is NHWC throughout: images `[B, H, W, 3]` in, feature map `[B, Hp, Wp, D]` out.
Module names mirror the PyTorch state_dict (`patch_embed/proj`, `blocks_{i}/attn/qkv`,
`blocks_{i}/mlp/fc2`, ...) so that checkpoint conversion is a lookup table
(see `posebh_jax/convert/torch_to_flax.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# timm / mmpose ViT init: trunc_normal_(std=.02) on Linear weights and pos_embed, zero biases.
_dense_init = nn.initializers.truncated_normal(stddev=0.02)
# PyTorch's Conv2d default (kaiming_uniform with a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)):
# the reference never re-initialises the patch-embedding conv.
_torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ViTMoEConfig:
  """Backbone sizes (`ViTMoE.config`). Defaults are PoseBH-B (spec §1). ViT-H: embed_dim 1280,
  depth 32, num_heads 16, part_features 320, drop_path_rate 0.55.

  Attributes:
    img_size: (H, W) input size; fixes the position-embedding grid.
    patch_size: patch-embedding kernel and stride.
    patch_padding: zero padding of the patch-embedding conv on every side (2 in PoseBH).
    embed_dim: token width D.
    depth: number of blocks.
    num_heads: attention heads.
    mlp_ratio: FFN hidden width / D.
    part_features: P, output channels of each expert (the shared fc2 gives D - P).
    num_experts: number of experts (one per training dataset).
    drop_path_rate: stochastic depth of the last block; block i uses linspace(0, rate, depth)[i].
  """
  img_size: tuple[int, int] = (256, 192)
  patch_size: int = 16
  patch_padding: int = 2
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  part_features: int = 192
  num_experts: int = 6
  drop_path_rate: float = 0.3


def grid_size(img_size: tuple[int, int], patch_size: int, padding: int) -> tuple[int, int]:
  """Token grid (Hp, Wp) of the padded patch-embedding conv (16x12 for 256x192, p=16, pad=2)."""
  h, w = ((s + 2 * padding - patch_size) // patch_size + 1 for s in img_size)
  return h, w


def drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Stochastic depth with timm semantics: drop whole samples of a residual branch.

  Args:
    module: the calling module (supplies a fresh key from the 'droppath' rng stream, so every
      call site, e.g. the attention and the MLP branch of a block, draws independently).
    x: branch output `[B, ...]`.
    rate: drop probability p; the kept samples are scaled by 1 / (1 - p).
    train: DropPath is active only in training.

  Returns:
    `x / (1 - p) * mask` with a per-sample Bernoulli(1 - p) mask, or `x` unchanged.
  """
  if not train or rate == 0.0:
    return x
  keep_prob = 1.0 - rate
  mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(module.make_rng("droppath"), keep_prob, mask_shape)
  return x / keep_prob * mask.astype(x.dtype)


class PatchEmbed(nn.Module):
  """Conv patch embedding: `[B, H, W, 3]` -> `[B, Hp, Wp, D]` (kernel = stride = patch, padded)."""
  embed_dim: int
  patch_size: int
  padding: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p, pad = self.patch_size, self.padding
    return nn.Conv(
        self.embed_dim, (p, p), strides=(p, p), padding=((pad, pad), (pad, pad)),
        kernel_init=_torch_conv_init, bias_init=nn.initializers.zeros,
        dtype=self.dtype, param_dtype=jnp.float32, name="proj")(x)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (bias) and an output projection."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, N, D]` -> `[B, N, D]`."""
    b, n, d = x.shape
    head_dim = d // self.num_heads
    dense = lambda f, name: nn.Dense(  # noqa: E731
        f, kernel_init=_dense_init, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    # PyTorch reshapes qkv to [B, N, 3, heads, head_dim]: the output channels are ordered
    # (q|k|v) x heads x head_dim, which a converted checkpoint relies on.
    qkv = dense(3 * d, "qkv")(x).reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, h, hd]
    q = q * head_dim ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    # Softmax in float32 even for bf16 compute: keeps attention weights well normalised.
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
    return dense(d, "proj")(out)


@jax.custom_vjp
def take_experts(table: jax.Array, index: jax.Array) -> jax.Array:
  """`table[index]`: each sample's expert rows, `[E, ...]` × `[B]` int -> `[B, ...]`.

  Only the gradient differs from plain indexing: the transpose of a gather is a scatter-add,
  which XLA runs as a zero-filled copy of the whole `[E, ...]` table plus a scatter per layer;
  here it is one contraction with the one-hot of `index`, `sum_b onehot[b, e] * g[b]`, written
  straight into the gradient. The same sums (a product by 1.0 or 0.0 is exact; samples that
  share an expert may add in another order). Alone it is no faster (`benchmarks/
  moe_expert_gather.py`), but XLA:CPU faults the step's whole scratch in on every step, and at
  PoseBH-B size this takes 162 MiB off it: the stage-2 step ran 1.018× (batch 2) and 1.013×
  (batch 8) faster on CPU (`benchmarks/step_parts.py --variants=scatter,full`; README,
  Benchmarks). A non-finite gradient row now reaches every expert's gradient (0 × NaN); the
  train step rejects such a step either way.
  """
  return table[index]


def _take_experts_fwd(table, index):
  return table[index], (index, table.shape[0])


def _take_experts_bwd(res, g):
  index, num_experts = res
  onehot = jax.nn.one_hot(index, num_experts, dtype=g.dtype)  # [B, E]
  return jnp.einsum("be,b...->e...", onehot, g), None  # No cotangent for the integer index.


take_experts.defvjp(_take_experts_fwd, _take_experts_bwd)


class MoEMlp(nn.Module):
  """FFN whose last `part_features` output channels come from a per-sample expert.

  `h = gelu(fc1(x))`; output = concat([fc2(h) (D - P channels), expert_{e_b}(h) (P channels)]).
  The expert of each sample is applied by gathering its weights (`[B, 4D, P]`), not by running
  every expert and masking as the reference does, so compute does not grow with the expert count.
  """
  hidden_features: int
  out_features: int
  part_features: int
  num_experts: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, dataset_index: jax.Array) -> jax.Array:
    """Applies the MoE MLP.

    Args:
      x: tokens `[B, N, D]`.
      dataset_index: `[B]` int, expert id of each sample.

    Returns:
      `[B, N, D]`.
    """
    shared_out = self.out_features - self.part_features
    h = nn.Dense(self.hidden_features, kernel_init=_dense_init, dtype=self.dtype,
                 param_dtype=jnp.float32, name="fc1")(x)
    h = jax.nn.gelu(h, approximate=False)  # The reference uses nn.GELU() (erf form).
    shared = nn.Dense(shared_out, kernel_init=_dense_init, dtype=self.dtype,
                      param_dtype=jnp.float32, name="fc2")(h)
    experts_kernel = self.param(
        "experts_kernel", _dense_init,
        (self.num_experts, self.hidden_features, self.part_features), jnp.float32)
    experts_bias = self.param(
        "experts_bias", nn.initializers.zeros, (self.num_experts, self.part_features),
        jnp.float32)
    kernel = take_experts(experts_kernel, dataset_index).astype(self.dtype)  # [B, 4D, P]
    bias = take_experts(experts_bias, dataset_index).astype(self.dtype)  # [B, P]
    expert = jnp.einsum("bnh,bhp->bnp", h.astype(self.dtype), kernel) + bias[:, None, :]
    return jnp.concatenate([shared, expert.astype(shared.dtype)], axis=-1)


class Block(nn.Module):
  """Pre-norm transformer block with DropPath on both residual branches."""
  num_heads: int
  mlp_ratio: float
  part_features: int
  num_experts: int
  drop_path_rate: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, dataset_index: jax.Array, train: bool) -> jax.Array:
    """`[B, N, D]` float32 residual stream -> `[B, N, D]` float32."""
    d = x.shape[-1]
    # LayerNorm in float32 (as under PyTorch autocast), output cast back to the compute dtype.
    ln = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32,  # noqa: E731
                                   param_dtype=jnp.float32, name=name)
    y = ln("norm1")(x).astype(self.dtype)
    y = Attention(self.num_heads, dtype=self.dtype, name="attn")(y)
    x = x + drop_path(self, y, self.drop_path_rate, train).astype(x.dtype)
    y = ln("norm2")(x).astype(self.dtype)
    y = MoEMlp(int(d * self.mlp_ratio), d, self.part_features, self.num_experts,
               dtype=self.dtype, name="mlp")(y, dataset_index)
    return x + drop_path(self, y, self.drop_path_rate, train).astype(x.dtype)


class ViTMoE(nn.Module):
  """ViTPose++ backbone with per-dataset MoE experts (spec §2.1).

  Attributes:
    config: the backbone's sizes (`ViTMoEConfig`: the one field list, from `config.model` by
      `experiment.build_model`).
    dtype: compute dtype of convs/matmuls; params are always float32.
  """
  config: ViTMoEConfig = ViTMoEConfig()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, dataset_index: jax.Array, *,
               train: bool) -> jax.Array:
    """Runs the backbone.

    Args:
      images: `[B, H, W, 3]` float, H, W = img_size.
      dataset_index: `[B]` int in [0, num_experts), selects each sample's expert.
      train: enables DropPath (needs the 'droppath' rng stream when drop_path_rate > 0).

    Returns:
      Feature map `[B, Hp, Wp, D]` float32 (16x12 for 256x192 inputs), after `last_norm`.
    """
    c = self.config
    hp, wp = grid_size(c.img_size, c.patch_size, c.patch_padding)
    x = PatchEmbed(c.embed_dim, c.patch_size, c.patch_padding, dtype=self.dtype,
                   name="patch_embed")(images.astype(self.dtype))
    # The residual stream stays float32 (as under PyTorch autocast, where fp16 branch outputs
    # are added to fp32 activations); only the matmuls/convs run in `dtype`.
    x = x.astype(jnp.float32)
    b, h, w, d = x.shape
    if (h, w) != (hp, wp):
      raise ValueError(f"input {images.shape[1:3]} gives a {h}x{w} token grid, "
                       f"expected {hp}x{wp} for img_size {c.img_size}")
    x = x.reshape(b, h * w, d)  # Row-major (h, w) token order, as PyTorch's flatten(2).
    pos_embed = self.param("pos_embed", _dense_init, (1, 1 + h * w, d), jnp.float32)
    # The reference keeps a "cls" slot but no cls token: that slot is added to every token.
    x = x + (pos_embed[:, 1:] + pos_embed[:, :1])
    rates = np.linspace(0.0, c.drop_path_rate, c.depth)
    for i in range(c.depth):
      x = Block(c.num_heads, c.mlp_ratio, c.part_features, c.num_experts,
                float(rates[i]), dtype=self.dtype, name=f"blocks_{i}")(x, dataset_index, train)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32,
                     name="last_norm")(x)
    return x.reshape(b, h, w, d)
