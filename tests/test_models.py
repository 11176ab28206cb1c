"""Unit tests of the backbone, heads and full model on tiny sizes (no shared data needed)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posebh_jax.models import (HeatmapHead, ModelOutputs, PoseBHModel, ProtoHead,
                               ProtoHeadConfig, ViTMoE, ViTMoEConfig)
from posebh_jax.models import heads as heads_lib
from posebh_jax.models import vit_moe

NUM_KEYPOINTS = (3, 5, 2)
IMG = (32, 24)  # Patch 8, padding 2 -> a 4x3 token grid; two deconvs -> 16x12 heatmaps.


def _tiny(**overrides) -> PoseBHModel:
  kwargs = dict(
      backbone=ViTMoEConfig(img_size=IMG, patch_size=8, patch_padding=2, embed_dim=16, depth=2,
                            num_heads=2, mlp_ratio=4.0, part_features=4, num_experts=3,
                            drop_path_rate=0.2),
      num_keypoints=NUM_KEYPOINTS,
      head_deconv_filters=(8, 8),
      proto_head=ProtoHeadConfig(deconv_filters=(8, 8), channels=4, out_channels=6),
  )
  kwargs.update(overrides)
  return PoseBHModel(**kwargs)


def _inputs(batch: int = 2, seed: int = 0):
  images = jax.random.normal(jax.random.key(seed), (batch, *IMG, 3))
  index = jnp.arange(batch, dtype=jnp.int32) % len(NUM_KEYPOINTS)
  return images, index


@pytest.fixture(scope="module")
def tiny_model_and_vars():
  model = _tiny()
  images, index = _inputs()
  init = jax.jit(lambda x, i: model.init({"params": jax.random.key(1)}, x, i, train=False))
  return model, init(images, index)


def test_output_shapes_and_dtypes(tiny_model_and_vars):
  model, variables = tiny_model_and_vars
  images, index = _inputs()
  out = model.apply(variables, images, index, train=False)
  assert isinstance(out, ModelOutputs)
  assert out.features.shape == (2, 4, 3, 16)
  assert [h.shape for h in out.heatmaps] == [(2, k, 16, 12) for k in NUM_KEYPOINTS]
  assert out.embedding.shape == (2, 16, 12, 6)
  for x in (*out.heatmaps, out.embedding, out.features):
    assert x.dtype == jnp.float32


def test_param_tree_mirrors_torch_names(tiny_model_and_vars):
  _, variables = tiny_model_and_vars
  p, bs = variables["params"], variables["batch_stats"]
  bb = p["backbone"]
  assert bb["pos_embed"].shape == (1, 1 + 4 * 3, 16)
  assert bb["patch_embed"]["proj"]["kernel"].shape == (8, 8, 3, 16)
  blk = bb["blocks_1"]
  assert set(blk) == {"norm1", "attn", "norm2", "mlp"}
  assert set(blk["attn"]) == {"qkv", "proj"}
  assert blk["mlp"]["fc1"]["kernel"].shape == (16, 64)
  assert blk["mlp"]["fc2"]["kernel"].shape == (64, 12)
  assert blk["mlp"]["experts_kernel"].shape == (3, 64, 4)
  assert blk["mlp"]["experts_bias"].shape == (3, 4)
  assert "last_norm" in bb
  for d, k in enumerate(NUM_KEYPOINTS):
    head = p[f"heads_{d}"]
    assert set(head) == {"deconv_layers_0", "deconv_layers_1", "deconv_layers_3",
                         "deconv_layers_4", "final_layer"}
    assert head["deconv_layers_0"]["kernel"].shape == (4, 4, 8, 16)  # [kh, kw, C_out, C_in].
    assert head["final_layer"]["kernel"].shape == (1, 1, 8, k)
    assert set(bs[f"heads_{d}"]) == {"deconv_layers_1", "deconv_layers_4"}
  proto = p["proto_head"]
  assert set(proto) == {"deconv_layers_0", "deconv_layers_1", "deconv_layers_3",
                        "deconv_layers_4", "neck", "head_0", "head_1", "head_3"}
  assert set(proto["neck"]) == {"conv1", "bn1", "conv2", "bn2", "downsample_0", "downsample_1"}
  assert "bias" not in proto["neck"]["downsample_0"]
  for leaf in jax.tree_util.tree_leaves(variables):
    assert leaf.dtype == jnp.float32


def test_single_deconv_and_no_proto_head():
  model = _tiny(head_deconv_filters=(8,), use_proto_head=False)
  images, index = _inputs()
  variables = model.init({"params": jax.random.key(1)}, images, index, train=False)
  out = model.apply(variables, images, index, train=False)
  assert out.embedding is None
  assert [h.shape for h in out.heatmaps] == [(2, k, 8, 6) for k in NUM_KEYPOINTS]
  assert "proto_head" not in variables["params"]


def test_expert_selection(tiny_model_and_vars):
  model, variables = tiny_model_and_vars
  images, _ = _inputs()
  feats = lambda idx, imgs=images: model.apply(  # noqa: E731
      variables, imgs, jnp.asarray(idx, jnp.int32), train=False).features
  a, b = feats([0, 1]), feats([0, 2])
  # Only the sample whose dataset index changed changes.
  np.testing.assert_array_equal(a[0], b[0])
  assert np.abs(np.asarray(a[1] - b[1])).max() > 1e-3
  # Per-sample expert == running that sample alone with that expert.
  np.testing.assert_allclose(b[1], feats([2], images[1:])[0], rtol=1e-5, atol=1e-5)
  # == a dense ViT whose every "expert" is expert 2 (spec §2.1: fc2 rows ++ expert_e rows).
  params = jax.tree_util.tree_map(lambda x: x, variables["params"])
  for i in range(2):
    mlp = params["backbone"][f"blocks_{i}"]["mlp"]
    mlp["experts_kernel"] = jnp.broadcast_to(mlp["experts_kernel"][2], mlp["experts_kernel"].shape)
    mlp["experts_bias"] = jnp.broadcast_to(mlp["experts_bias"][2], mlp["experts_bias"].shape)
  c = model.apply({**variables, "params": params}, images, jnp.asarray([0, 0]),
                  train=False).features
  np.testing.assert_allclose(b[1], c[1], rtol=1e-5, atol=1e-5)


def test_drop_path_eval_deterministic_train_stochastic(tiny_model_and_vars):
  model, variables = tiny_model_and_vars
  images, index = _inputs()

  def run(seed, train):
    out, _ = model.apply(variables, images, index, train=train,
                         rngs={"droppath": jax.random.key(seed)}, mutable=["batch_stats"])
    return np.asarray(out.features)

  # Eval needs no rng and ignores it.
  e0 = model.apply(variables, images, index, train=False).features
  np.testing.assert_array_equal(run(0, False), e0)
  np.testing.assert_array_equal(run(1, False), e0)
  t0, t0b = run(0, True), run(0, True)
  np.testing.assert_array_equal(t0, t0b)
  draws = [run(s, True) for s in range(6)]
  assert any(np.abs(d - draws[0]).max() > 1e-4 for d in draws[1:])
  assert any(np.abs(d - np.asarray(e0)).max() > 1e-4 for d in draws)
  # With rate 0 training features equal eval features.
  no_dp = _tiny(backbone=ViTMoEConfig(img_size=IMG, patch_size=8, patch_padding=2, embed_dim=16,
                                      depth=2, num_heads=2, part_features=4, num_experts=3,
                                      drop_path_rate=0.0))
  out, _ = no_dp.apply(variables, images, index, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(out.features, e0, rtol=1e-6, atol=1e-6)


def test_drop_path_mask_semantics():
  class Wrap(nn.Module):
    @nn.compact
    def __call__(self, x):
      return vit_moe.drop_path(self, x, 0.5, train=True)

  x = jnp.ones((64, 3, 2))
  y = np.asarray(Wrap().apply({}, x, rngs={"droppath": jax.random.key(0)}))
  per_sample = y.reshape(64, -1)
  # Whole samples are dropped or scaled by 1 / keep_prob.
  assert set(np.unique(per_sample)) <= {0.0, 2.0}
  assert np.all(per_sample.min(1) == per_sample.max(1))
  assert 10 < (per_sample[:, 0] == 0).sum() < 54


def test_batch_stats_update_in_train(tiny_model_and_vars):
  model, variables = tiny_model_and_vars
  images, index = _inputs()
  _, updates = model.apply(variables, images, index, train=True,
                           rngs={"droppath": jax.random.key(0)}, mutable=["batch_stats"])
  old = jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
  new = dict(jax.tree_util.tree_leaves_with_path(updates["batch_stats"]))
  assert len(old) == len(new) > 0
  for path, leaf in old:
    assert not np.allclose(leaf, new[path]), jax.tree_util.keystr(path)
  # Eval leaves the statistics alone (and does not need them mutable).
  out = model.apply({**variables, "batch_stats": updates["batch_stats"]}, images, index,
                    train=False)
  assert out.heatmaps[0].shape == (2, 3, 16, 12)


def test_moe_mlp_uses_exact_gelu():
  d, hidden, part, experts = 6, 12, 2, 3
  mlp = vit_moe.MoEMlp(hidden, d, part, experts)
  x = jax.random.normal(jax.random.key(0), (2, 5, d))
  idx = jnp.array([2, 0])
  variables = mlp.init(jax.random.key(1), x, idx)
  # Large weights so that hidden activations span the range where erf and tanh GELU differ.
  rng = np.random.default_rng(0)
  p = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32),
                             variables["params"])
  y = np.asarray(mlp.apply({"params": p}, x, idx), np.float64)

  xn = np.asarray(x, np.float64)
  h = xn @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  erf = np.vectorize(math.erf)
  g_exact = 0.5 * h * (1 + erf(h / math.sqrt(2)))
  g_tanh = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))

  def ref(g):
    shared = g @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    expert = np.stack([g[b] @ p["experts_kernel"][e] + p["experts_bias"][e]
                       for b, e in enumerate(np.asarray(idx))])
    return np.concatenate([shared, expert], -1)

  np.testing.assert_allclose(y, ref(g_exact), rtol=1e-5, atol=1e-5)
  assert np.abs(y - ref(g_tanh)).max() > 1e-3


def _torch_conv_transpose_ref(x: np.ndarray, w: np.ndarray, stride: int, pad: int,
                              out_pad: int) -> np.ndarray:
  """PyTorch ConvTranspose2d by its scatter definition: out[o, i*s - p + a] += x[c, i] w[c, o, a].

  Args:
    x: `[C_in, H, W]`; w: `[C_in, C_out, k, k]`.

  Returns:
    `[C_out, (H - 1) s - 2p + k + op, (W - 1) s - 2p + k + op]`.
  """
  c_in, h, wd = x.shape
  k = w.shape[2]
  ho, wo = (h - 1) * stride - 2 * pad + k + out_pad, (wd - 1) * stride - 2 * pad + k + out_pad
  out = np.zeros((w.shape[1], ho, wo))
  for i in range(h):
    for j in range(wd):
      for a in range(k):
        for b in range(k):
          oi, oj = i * stride - pad + a, j * stride - pad + b
          if 0 <= oi < ho and 0 <= oj < wo:
            out[:, oi, oj] += x[:, i, j] @ w[:, :, a, b]
  return out


@pytest.mark.parametrize("kernel", [4, 3, 2])
def test_conv_transpose_matches_pytorch_definition(kernel):
  rng = np.random.default_rng(kernel)
  c_in, c_out, h, w = 3, 5, 4, 3
  x = rng.normal(size=(2, c_in, h, w))
  weight = rng.normal(size=(c_in, c_out, kernel, kernel))  # PyTorch layout [C_in, C_out, k, k].
  pad, out_pad = heads_lib.deconv_padding(kernel)

  class Wrap(nn.Module):
    @nn.compact
    def __call__(self, y):
      return heads_lib.torch_conv_transpose(c_out, kernel, "deconv")(y)

  params = {"deconv": {"kernel": jnp.asarray(weight.transpose(2, 3, 1, 0), jnp.float32)}}
  got = Wrap().apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
  want = np.stack([_torch_conv_transpose_ref(xi, weight, 2, pad, out_pad) for xi in x])
  assert want.shape[2:] == (2 * h, 2 * w)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [4, 3, 2])
def test_conv_transpose_matches_lax_forward_and_gradients(kernel):
  """The GEMM + overlap-add layer equals the dilated `lax.conv_transpose` (flax's old layer):
  outputs, and gradients with respect to the input and the kernel, on random data."""
  rng = np.random.default_rng(10 + kernel)
  x = jnp.asarray(rng.normal(size=(2, 5, 4, 6)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kernel, kernel, 7, 6)), jnp.float32)  # [k, k, C_out, C_in]
  cot = jnp.asarray(rng.normal(size=(2, 10, 8, 7)), jnp.float32)
  pad, out_pad = heads_lib.deconv_padding(kernel)
  lax_pad = (kernel - 1 - pad, kernel - 1 - pad + out_pad)

  def old(x, k):
    return jax.lax.conv_transpose(x, k, (2, 2), (lax_pad, lax_pad), transpose_kernel=True,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def new(x, k):
    return heads_lib.conv_transpose_2x(x, k, pad, out_pad)

  np.testing.assert_allclose(new(x, k), old(x, k), rtol=1e-5, atol=1e-5)
  g_old = jax.grad(lambda x, k: jnp.vdot(old(x, k), cot), argnums=(0, 1))(x, k)
  g_new = jax.grad(lambda x, k: jnp.vdot(new(x, k), cot), argnums=(0, 1))(x, k)
  for a, b in zip(g_new, g_old):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_conv_transpose_param_is_flax_conv_transpose_param():
  """Same parameter name, shape and seeded init as `nn.ConvTranspose(transpose_kernel=True)`,
  so converted checkpoints and the goldens made with the old layer load unchanged."""
  x = jnp.ones((1, 3, 2, 6))

  class Old(nn.Module):
    @nn.compact
    def __call__(self, y):
      return nn.ConvTranspose(5, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                              use_bias=False, transpose_kernel=True,
                              kernel_init=nn.initializers.normal(0.001), name="deconv")(y)

  class New(nn.Module):
    @nn.compact
    def __call__(self, y):
      return heads_lib.torch_conv_transpose(5, 4, "deconv")(y)

  p_old = Old().init(jax.random.key(3), x)
  p_new = New().init(jax.random.key(3), x)
  assert jax.tree.structure(p_old) == jax.tree.structure(p_new)
  np.testing.assert_array_equal(p_new["params"]["deconv"]["kernel"],
                                p_old["params"]["deconv"]["kernel"])
  np.testing.assert_allclose(New().apply(p_old, x), Old().apply(p_old, x), rtol=1e-5, atol=1e-7)


def test_heads_standalone_shapes():
  x = jnp.ones((2, 4, 3, 16))
  head = HeatmapHead(7, deconv_filters=(8,), final_kernel=3)
  v = head.init(jax.random.key(0), x, train=False)
  assert head.apply(v, x, train=False).shape == (2, 7, 8, 6)
  proto = ProtoHead(deconv_filters=(8, 8), channels=4, out_channels=5)
  v = proto.init(jax.random.key(0), x, train=False)
  assert proto.apply(v, x, train=False).shape == (2, 16, 12, 5)


def test_backbone_rejects_wrong_input_size():
  model = ViTMoE(ViTMoEConfig(img_size=IMG, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                              part_features=4, num_experts=2))
  with pytest.raises(ValueError, match="token grid"):
    model.init(jax.random.key(0), jnp.ones((1, 40, 24, 3)), jnp.zeros((1,), jnp.int32),
               train=False)


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny_model_and_vars):
  model, variables = tiny_model_and_vars
  images, index = _inputs()
  bf16 = _tiny(dtype=jnp.bfloat16)
  v16 = jax.eval_shape(lambda x, i: bf16.init({"params": jax.random.key(1)}, x, i, train=False),
                       images, index)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(v16))
  # One jitted graph compiles faster than op-by-op bf16 dispatch.
  out16 = jax.jit(lambda v, x, i: bf16.apply(v, x, i, train=False))(variables, images, index)
  out32 = model.apply(variables, images, index, train=False)
  for a, b in zip((*out16.heatmaps, out16.embedding, out16.features),
                  (*out32.heatmaps, out32.embedding, out32.features)):
    assert a.dtype == jnp.float32
    scale = float(np.abs(np.asarray(b)).max())
    np.testing.assert_allclose(a, b, atol=0.05 * scale + 1e-6)


def test_head0_computes_in_float32_under_bfloat16(tiny_model_and_vars):
  # Spec §2.6.2 / §2.8: the reference runs head 0 with autocast off. On the same (bf16-computed)
  # features, head 0 must equal a float32 head exactly, while head 1 (bf16) must not.
  _, variables = tiny_model_and_vars
  images, index = _inputs()
  out16 = jax.jit(lambda v, x, i: _tiny(dtype=jnp.bfloat16).apply(v, x, i, train=False))(
      variables, images, index)

  def head(d, dtype):
    h = HeatmapHead(NUM_KEYPOINTS[d], (8, 8), dtype=dtype)
    v = {"params": variables["params"][f"heads_{d}"],
         "batch_stats": variables["batch_stats"][f"heads_{d}"]}
    return jax.jit(lambda v, f: h.apply(v, f, train=False))(v, out16.features)

  ref0, ref1 = head(0, jnp.float32), head(1, jnp.float32)
  scale0, scale1 = float(np.abs(ref0).max()), float(np.abs(ref1).max())
  np.testing.assert_allclose(out16.heatmaps[0], ref0, atol=1e-6 * scale0)  # Float32 rounding.
  assert np.abs(out16.heatmaps[1] - ref1).max() > 1e-4 * scale1  # bf16 rounding (~4e-3).
