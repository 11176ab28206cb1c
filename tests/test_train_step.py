"""The jitted train step: 1 device vs a mesh of 8, compiled once, prototypes outside the optimizer.

Why two optimizers: parameters whose true gradient is zero (conv biases directly followed by
BatchNorm, which removes any constant) get gradients of pure float noise, and Adam divides by
sqrt(v) + eps, turning that noise into steps of ±lr whose sign depends on reduction order. With
a linear optimizer (SGD) every parameter must agree across device counts to float precision over
several steps; with the real AdamW one step (in warmup) must agree as well.
"""

import dataclasses

import chex
import jax
import numpy as np
import optax
import pytest

from configs import synthetic
from data_pipelines import pipeline
from posebh_jax import experiment
from posebh_jax.train import loop, optimizer, sharding, step as step_lib


def _setup():
  cfg = synthetic.get_config("tiny")
  layout = experiment.build_layout(cfg)
  return cfg, layout, experiment.build_model(cfg, layout)


def _batch(cfg, layout, seed):
  rs = np.random.RandomState(seed)
  b, (h, w), (hh, hw), k = cfg.train.batch_size, cfg.data.image_size, cfg.data.heatmap_size, 17
  ds = (np.arange(b) % 3).astype(np.int32)
  return dict(image=rs.randn(b, h, w, 3).astype(np.float32),
              target=rs.rand(b, k, hh, hw).astype(np.float32),
              target_weight=(rs.rand(b, k) > 0.3).astype(np.float32), dataset_index=ds,
              skeleton_mask=layout.skeleton_mask()[ds])


def _run(num_devices, num_steps, tx=None, step_cfg_overrides=None, stage2=False):
  """Runs `num_steps` steps; `stage2`: prototypes frozen and clustered, CPS and CSS on."""
  cfg, layout, model = _setup()
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:num_devices])
  state, _, shard, real_tx = loop.create_train_state(cfg, model, layout, mesh)
  if stage2:
    state = loop.cluster_state(cfg, state, shard)
  if tx is not None:
    state = state.replace(opt_state=jax.device_put(tx.init(state.params), sharding.replicated(mesh)))
    shard = shard.replace(opt_state=jax.tree_util.tree_map(lambda _: sharding.replicated(mesh),
                                                           state.opt_state))
  scfg = loop.step_config(cfg, layout)
  if stage2:
    scfg = dataclasses.replace(scfg, update_prototypes=False, cps=True, css=True)
  if step_cfg_overrides:
    scfg = dataclasses.replace(scfg, **step_cfg_overrides)
  fn = step_lib.make_train_step(model, tx or real_tx, scfg, mesh, shard)
  initial = jax.device_get(state)
  metrics = []
  for i in range(num_steps):
    state, m = fn(state, pipeline.to_global_batch(_batch(cfg, layout, i), mesh))
    metrics.append(jax.device_get(m))
  return initial, jax.device_get(state), metrics


_STATE_ARRAYS = ("params", "batch_stats", "prototypes", "cluster_prototypes", "cluster_keypoint")


def _assert_states_close(a, b, atol, names=_STATE_ARRAYS):
  for name in names:
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(getattr(a, name))[0],
                            jax.tree_util.tree_leaves(getattr(b, name))):
      np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5,
                                 err_msg=f"{name}{jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("stage2", [False, True], ids=["stage1_ema", "stage2_cps_css"])
def test_eight_devices_equal_one_device_sgd_three_steps(stage2):
  # Stage 1 includes the Gumbel-sampled EMA update of the prototypes over the global batch;
  # stage 2 the clustered table, CPS and CSS.
  assert len(jax.devices()) == 8
  _, one, m1 = _run(1, 3, tx=optax.sgd(0.05), stage2=stage2)
  _, eight, m8 = _run(8, 3, tx=optax.sgd(0.05), stage2=stage2)
  assert int(one.step) == int(eight.step) == 3
  _assert_states_close(one, eight, atol=2e-6)
  for a, b in zip(m1, m8):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)


def test_eight_devices_equal_one_device_adamw_step():
  before, one, m1 = _run(1, 1)
  _, eight, m8 = _run(8, 1)
  _assert_states_close(one, eight, atol=1e-6, names=("batch_stats", "prototypes",
                                                      "cluster_prototypes"))
  for k in m1[0]:
    np.testing.assert_allclose(m1[0][k], m8[0][k], rtol=1e-5, err_msg=k)
  # Adam's first step is lr·g/(|g|+eps): a gradient that is float noise around zero (e.g. a conv
  # bias feeding BatchNorm) can flip sign between reduction orders. Allow that for a handful of
  # elements, bounded by 2·lr, and nothing more.
  lr0 = float(optimizer.learning_rate_schedule(synthetic.get_config("tiny").train)(0))
  off = total = 0
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(one.params)[0],
                          jax.tree_util.tree_leaves(eight.params)):
    off += int(np.sum(np.abs(x - y) > 1e-6 + 1e-5 * np.abs(x)))
    total += x.size
    assert np.all(np.abs(x - y) <= 2 * lr0 + 1e-6), jax.tree_util.keystr(path)
  assert off / total <= 2e-3, (off, total)
  assert any(np.abs(x - x0).max() > 0 for x, x0 in zip(jax.tree_util.tree_leaves(one.params),
                                                        jax.tree_util.tree_leaves(before.params)))


def test_step_compiles_once(monkeypatch):
  monkeypatch.setattr(step_lib, "train_step", chex.assert_max_traces(step_lib.train_step, n=1))
  _, state, metrics = _run(8, 3)
  assert int(state.step) == 3 and np.isfinite(metrics[-1]["loss/total"])


def test_prototypes_change_only_by_ema_and_only_with_target_pixels():
  before, after, m = _run(1, 2, tx=optax.sgd(0.01))
  assert not np.allclose(before.prototypes, after.prototypes)
  assert m[0]["proto/pixels"] > 0
  # No pixel passes the sampling threshold: the EMA has nothing to follow, and no gradient ever
  # reaches the prototypes, so they stay exactly as initialised.
  before, after, m = _run(1, 2, tx=optax.sgd(0.01),
                          step_cfg_overrides=dict(sample_threshold=2.0))
  np.testing.assert_array_equal(before.prototypes, after.prototypes)
  assert m[0]["proto/pixels"] == 0
  assert "prototypes" not in str(jax.tree_util.tree_structure(after.opt_state))


def test_stage2_freezes_prototypes_and_uses_the_clustered_table():
  before, after, m = _run(1, 2, tx=optax.sgd(0.01), stage2=True)
  np.testing.assert_array_equal(before.prototypes, after.prototypes)
  np.testing.assert_array_equal(before.cluster_prototypes, after.cluster_prototypes)
  c = before.cluster_keypoint
  assert c.shape == (20,) and np.all((c >= 0) & (c < 48))  # Clustered (not the -1 placeholder).
  # Every cluster prototype is one of the keypoint prototypes (spec §3.3 step 4).
  flat = before.prototypes.reshape(-1, before.prototypes.shape[-1])
  for row in before.cluster_prototypes.reshape(-1, flat.shape[-1]):
    assert np.min(np.abs(flat - row).max(-1)) < 1e-6
  assert np.isfinite(m[-1]["loss/cps"]) and m[-1]["loss/cps"] > 0


def test_proto_head_learns_only_from_the_prototype_loss():
  before, after, _ = _run(1, 1, tx=optax.sgd(0.1), step_cfg_overrides=dict(phm_weight=0.0, proto_weight=0.0))
  for x, y in zip(jax.tree_util.tree_leaves(before.params["proto_head"]),
                  jax.tree_util.tree_leaves(after.params["proto_head"])):
    np.testing.assert_array_equal(x, y)
  assert not np.allclose(before.params["heads_0"]["final_layer"]["kernel"],
                         after.params["heads_0"]["final_layer"]["kernel"])
  before, after, _ = _run(1, 1, tx=optax.sgd(0.1))
  moved = [not np.allclose(x, y) for x, y in zip(
      jax.tree_util.tree_leaves(before.params["proto_head"]),
      jax.tree_util.tree_leaves(after.params["proto_head"]))]
  assert any(moved)


def test_non_divisible_batch_fails_loudly():
  cfg, _, _ = _setup()
  mesh = sharding.make_mesh(cfg.mesh)
  with pytest.raises(ValueError, match="not divisible by 8 devices"):
    sharding.check_batch_size(12, mesh)


def test_prototype_loss_does_not_reach_the_backbone_when_detached():
  # Only the prototype-heatmap loss: the detached backbone (the default) must not move, while the
  # prototype head does.
  before, after, _ = _run(1, 1, tx=optax.sgd(0.1), step_cfg_overrides=dict(heatmap_weight=0.0))
  for x, y in zip(jax.tree_util.tree_leaves(before.params["backbone"]),
                  jax.tree_util.tree_leaves(after.params["backbone"])):
    np.testing.assert_array_equal(x, y)
  assert any(not np.allclose(x, y) for x, y in zip(
      jax.tree_util.tree_leaves(before.params["proto_head"]),
      jax.tree_util.tree_leaves(after.params["proto_head"])))


def test_fresh_run_starts_from_converted_weights(tmp_path):
  from posebh_jax.convert import weights as weights_lib
  cfg, layout, model = _setup()
  mesh = sharding.make_mesh(cfg.mesh)
  state, _, shard, _ = loop.create_train_state(cfg, model, layout, mesh)
  other_cfg = synthetic.get_config("tiny")
  other_cfg.seed = 1
  other, _, _, _ = loop.create_train_state(other_cfg, model, layout, mesh)
  # A ViTPose++-style conversion: weights without prototypes or cluster table.
  w = weights_lib.PretrainedWeights(params=other.params, batch_stats=other.batch_stats,
                                    prototypes=None, cluster_prototypes=None,
                                    cluster_keypoint=None)
  weights_lib.save_weights(str(tmp_path / "w"), w, {"source": "test"})
  cfg.init.weights = str(tmp_path / "w")
  started = loop.init_from_weights(cfg, state, model, layout, shard)
  for a, b in zip(jax.tree_util.tree_leaves(started.params), jax.tree_util.tree_leaves(other.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(started.prototypes, state.prototypes)  # Kept: none in weights.
  assert started.params["backbone"]["pos_embed"].sharding == shard.params["backbone"]["pos_embed"]
  # Now with prototypes: they replace the fresh ones.
  w = w.replace(prototypes=other.prototypes)
  weights_lib.save_weights(str(tmp_path / "w2"), w, {"source": "test"})
  cfg.init.weights = str(tmp_path / "w2")
  started = loop.init_from_weights(cfg, state, model, layout, shard)
  np.testing.assert_array_equal(started.prototypes, other.prototypes)
