"""The reference's optimizer (spec §3.4): layer decay, no-decay set, clipping, schedule, freezing.

The update is checked against a NumPy transcription of PyTorch's AdamW + clip_grad_norm_ with
per-parameter lazily created state, run on the same gradients.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common, posebh
from posebh_jax.train import optimizer as opt


def _config(**train):
  c = common.base_config()
  c.model.depth = 2
  for k, v in train.items():
    c.train[k] = v
  return c


def _params(seed=0):
  rs = np.random.RandomState(seed)
  f = lambda *s: jnp.asarray(rs.randn(*s).astype(np.float32))
  return {
      "backbone": {"pos_embed": f(1, 3, 4), "patch_embed": {"proj": {"kernel": f(2, 2, 3, 4),
                                                                      "bias": f(4)}},
                   "blocks_0": {"fc": {"kernel": f(4, 4), "bias": f(4)}},
                   "blocks_1": {"fc": {"kernel": f(4, 4)}, "norm": {"scale": f(4)}},
                   "last_norm": {"scale": f(4)}},
      "heads_0": {"final_layer": {"kernel": f(1, 1, 4, 3), "bias": f(3)}},
      "heads_1": {"final_layer": {"kernel": f(1, 1, 4, 2), "bias": f(2)}},
      "proto_head": {"head_0": {"kernel": f(3, 3, 4, 2)}, "experts_bias": f(3, 2)},
  }


def test_layer_ids_and_scales_of_vit_b():
  # Spec §3.4 step 4: heads/last_norm 1.0, block 11 0.75, block 0 0.75^12, patch/pos 0.75^13.
  c = posebh.get_config("b")
  assert (c.train.layer_decay, c.model.depth) == (0.75, 12)
  ids = {"backbone/pos_embed": 0, "backbone/patch_embed/proj/kernel": 0,
         "backbone/blocks_0/attn/qkv/kernel": 1, "backbone/blocks_11/mlp/experts_kernel": 12,
         "backbone/last_norm/scale": 13, "heads_5/final_layer/bias": 13,
         "proto_head/neck/conv1/kernel": 13}
  for name, want in ids.items():
    assert opt.layer_id(name.split("/"), 12) == want, name
  scales = opt.lr_scales({"backbone": {"pos_embed": 0, "blocks_0": {"k": 0}, "blocks_11": {"k": 0},
                                       "last_norm": {"scale": 0}}, "heads_0": {"k": 0}}, 0.75, 12)
  assert scales["backbone"]["pos_embed"] == pytest.approx(0.75 ** 13)
  assert scales["backbone"]["pos_embed"] == pytest.approx(0.0238, abs=1e-4)
  assert scales["backbone"]["blocks_0"]["k"] == pytest.approx(0.75 ** 12)
  assert scales["backbone"]["blocks_11"]["k"] == pytest.approx(0.75)
  assert scales["backbone"]["last_norm"]["scale"] == scales["heads_0"]["k"] == 1.0
  # ViT-H: block i → 0.8^(32−i), patch/pos → 0.8^33.
  h = opt.lr_scales({"backbone": {"blocks_7": {"k": 0}, "pos_embed": 0}}, 0.8, 32)
  assert h["backbone"]["blocks_7"]["k"] == pytest.approx(0.8 ** 25)
  assert h["backbone"]["pos_embed"] == pytest.approx(0.8 ** 33)


def test_weight_decay_set():
  m = opt.weight_decay_mask(_params())
  assert m["backbone"]["patch_embed"]["proj"]["kernel"] and m["heads_0"]["final_layer"]["kernel"]
  assert not m["backbone"]["pos_embed"]  # 3-D but named pos_embed.
  assert not m["backbone"]["patch_embed"]["proj"]["bias"]  # 1-D.
  assert not m["backbone"]["blocks_1"]["norm"]["scale"]  # 1-D.
  assert not m["proto_head"]["experts_bias"]  # 2-D but a bias.


def test_step_schedule_with_warmup_exact():
  c = _config(lr_schedule="step", learning_rate=1e-3, warmup_steps=500, warmup_ratio=1e-3,
              decay_steps=(73000, 131400), decay_factor=0.1, num_steps=146000)
  lr = opt.learning_rate_schedule(c.train)
  want = {0: 1e-6, 250: 1e-3 * (1 - 0.5 * 0.999), 499: 1e-3 * (1 - (1 / 500) * 0.999),
          500: 1e-3, 72999: 1e-3, 73000: 1e-4, 131399: 1e-4, 131400: 1e-5, 145999: 1e-5}
  for step, v in want.items():
    assert float(lr(step)) == pytest.approx(v, rel=1e-6), step
  cos = opt.learning_rate_schedule(_config(lr_schedule="cosine", warmup_steps=10, num_steps=110).train)
  assert float(cos(0)) == pytest.approx(1e-6, rel=1e-4) and float(cos(10)) == pytest.approx(1e-3)
  assert float(cos(60)) == pytest.approx(0.5e-3, rel=1e-5) and float(cos(110)) == pytest.approx(0)
  with pytest.raises(ValueError, match="unknown train.lr_schedule"):
    opt.learning_rate_schedule(_config(lr_schedule="poly").train)


def _torch_adamw_reference(params, grads_seq, trainable_seq, *, lr_fn, scales, decays, wd,
                           clip, b1=0.9, b2=0.999, eps=1e-8, reset_on_thaw=True):
  """PyTorch AdamW + clip_grad_norm_ over the trainable leaves, lazily created state per leaf.

  A leaf's state is created at its first update (step counter 1 then) and dropped when its group
  is thawed again (the JAX optimizer's `reset_groups`).
  """
  names = list(params)
  p = {n: np.array(v, np.float64) for n, v in params.items()}
  state = {}
  prev = None
  for t, (grads, trainable) in enumerate(zip(grads_seq, trainable_seq)):
    if prev is not None and reset_on_thaw:
      for n in names:
        if trainable[n] and not prev[n]:
          state.pop(n, None)
    prev = trainable
    live = [n for n in names if trainable[n]]
    norm = np.sqrt(sum(np.sum(np.square(grads[n], dtype=np.float64)) for n in live))
    coef = min(1.0, clip / (norm + 1e-6))
    lr = lr_fn(t)
    for n in live:
      g = grads[n] * coef
      s = state.setdefault(n, dict(step=0, m=np.zeros_like(p[n]), v=np.zeros_like(p[n])))
      s["step"] += 1
      lr_g = lr * scales[n]
      if decays[n]:
        p[n] = p[n] * (1 - lr_g * wd)
      s["m"] = b1 * s["m"] + (1 - b1) * g
      s["v"] = b2 * s["v"] + (1 - b2) * g * g
      bc1, bc2 = 1 - b1 ** s["step"], 1 - b2 ** s["step"]
      denom = np.sqrt(s["v"]) / np.sqrt(bc2) + eps
      p[n] = p[n] - (lr_g / bc1) * s["m"] / denom
  return p


def _flat(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_adamw_matches_pytorch_with_layer_decay_clipping_and_freezing():
  c = _config(lr_schedule="step", learning_rate=1e-2, warmup_steps=2, decay_steps=(3,),
              weight_decay=0.1, layer_decay=0.5, clip_norm=1.0, num_steps=6)
  params = _params()
  tx = opt.make_optimizer(c, params)
  assert tx.groups == ("backbone", "heads", "proto_head")
  # Stages: proto only (0-1), heads + proto (2-3), everything (4-5). Gradients large enough that
  # clipping is active, and different per step.
  stages = [("proto_head",)] * 2 + [("heads", "proto_head")] * 2 + [opt.GROUPS] * 2
  rs = np.random.RandomState(1)
  grads_seq = [jax.tree_util.tree_map(lambda x: jnp.asarray(rs.randn(*x.shape).astype(np.float32)),
                                      params) for _ in stages]
  state = tx.init(params)
  p = params
  for t, trainable in enumerate(stages):
    if t and set(trainable) - set(stages[t - 1]):
      state = tx.reset_groups(state, set(trainable) - set(stages[t - 1]))
    before = state
    g = {k: v for k, v in grads_seq[t].items() if opt.param_group(k) in trainable}
    p, state, stats = jax.jit(lambda p, s, g, t=t, tr=trainable: tx.update(
        g, s, p, step=jnp.int32(t), trainable=tr))(p, state, g)
    for grp in opt.GROUPS:
      if grp not in trainable:  # Frozen: Adam state untouched, bit for bit.
        for a, b in zip(jax.tree_util.tree_leaves(before[grp]), jax.tree_util.tree_leaves(state[grp])):
          np.testing.assert_array_equal(a, b)
    want_norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(g)))
    np.testing.assert_allclose(stats["grad_norm"], want_norm, rtol=1e-6)
  assert int(state["proto_head"].count) == 6 and int(state["heads"].count) == 4
  assert int(state["backbone"].count) == 2  # Fresh bias correction from its thaw at step 4.

  flat_p = _flat(params)
  group_of = {n: opt.param_group(n.split("'")[1]) for n in flat_p}
  want = _torch_adamw_reference(
      flat_p, [{n: np.asarray(v, np.float64) for n, v in _flat(g).items()} for g in grads_seq],
      [{n: group_of[n] in s for n in flat_p} for s in stages],
      lr_fn=lambda t: float(opt.learning_rate_schedule(c.train)(t)),
      scales=_flat(opt.lr_scales(params, 0.5, 2)), decays=_flat(opt.weight_decay_mask(params)),
      wd=0.1, clip=1.0)
  got = _flat(p)
  for n in flat_p:
    np.testing.assert_allclose(got[n], want[n], rtol=2e-6, atol=2e-7, err_msg=n)
  # Frozen throughout stage 1: the backbone moved only in the last two steps, and a frozen
  # pos_embed would not decay either; here it moved with the lowest scale 0.5^3.
  assert not np.allclose(got["['backbone']['pos_embed']"], flat_p["['backbone']['pos_embed']"])


def test_frozen_group_gets_no_update_and_no_decay():
  c = _config(weight_decay=0.5, warmup_steps=1)
  params = _params()
  tx = opt.make_optimizer(c, params)
  g = {k: v for k, v in params.items() if k.startswith("heads_")}
  new, state, _ = tx.update(g, tx.init(params), params, step=jnp.int32(3), trainable=("heads",))
  for k in ("backbone", "proto_head"):
    for a, b in zip(jax.tree_util.tree_leaves(params[k]), jax.tree_util.tree_leaves(new[k])):
      np.testing.assert_array_equal(a, b)
  assert not np.allclose(new["heads_0"]["final_layer"]["kernel"],
                         params["heads_0"]["final_layer"]["kernel"])
  with pytest.raises(ValueError, match="trainable"):
    tx.update(g, state, params, step=jnp.int32(0), trainable=("heads", "backbone"))


def test_all_trainable_without_layer_decay_equals_optax_adamw():
  # The synthetic default (cosine, no layer decay, nothing frozen) trains as before this
  # optimizer: clip + optax.adamw with the same mask (no clipping here: small gradients).
  c = _config(lr_schedule="cosine", warmup_steps=3, num_steps=10, weight_decay=0.1)
  params = _params()
  import optax
  ref_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      opt.learning_rate_schedule(c.train), eps=1e-8, weight_decay=0.1,
      mask=opt.weight_decay_mask(params)))
  tx = opt.make_optimizer(c, params)
  rs = np.random.RandomState(2)
  p_ref, s_ref, p, s = params, ref_tx.init(params), params, tx.init(params)
  for t in range(4):
    g = jax.tree_util.tree_map(lambda x: jnp.asarray(0.01 * rs.randn(*x.shape), jnp.float32),
                               params)
    u, s_ref = ref_tx.update(g, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
    p, s, _ = tx.update(g, s, p, step=jnp.int32(t), trainable=tx.groups)
  for a, b in zip(jax.tree_util.tree_leaves(p_ref), jax.tree_util.tree_leaves(p)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_unknown_collection_fails():
  with pytest.raises(ValueError, match="no freeze group"):
    opt.split_groups({"decoder": {}})
  assert isinstance(common.base_config().train, ml_collections.ConfigDict)
