"""The jitted train step: 1 device vs meshes of 8 (data=8, and data=2 × fsdp=4), compiled once,
prototypes outside the optimizer, parameters sharded by fsdp.

Why two optimizers: parameters whose true gradient is zero (conv biases directly followed by
BatchNorm, which removes any constant) get gradients of pure float noise, and Adam divides by
sqrt(v) + eps, turning that noise into steps of ±lr whose sign depends on reduction order. With
a linear optimizer (SGD) every parameter must agree across meshes to float precision over
several steps; with the real AdamW one step (in warmup) must agree as well.

Runs are cached (`_run`) and shared between tests: each distinct run compiles once per session.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import synthetic
from data_pipelines import datasets, pipeline
from posebh_jax import experiment
from posebh_jax.train import loop, optimizer, sharding, step as step_lib

# (data, fsdp) per mesh name; fsdp leaves from 64 elements so that the tiny model shards.
_MESHES = {"1": (1, 1), "8": (8, 1), "2x4": (2, 4)}
_FSDP_MIN_SIZE = 64


def _setup(mesh_name="8", dtype="float32", detach=None):
  cfg = synthetic.get_config("tiny")
  cfg.model.dtype = dtype
  if detach is not None:
    cfg.model.proto.detach_backbone = detach
  cfg.mesh.data, cfg.mesh.fsdp = _MESHES[mesh_name]
  cfg.mesh.fsdp_min_size = _FSDP_MIN_SIZE
  layout = datasets.build_layout(cfg)
  return cfg, layout, experiment.build_model(cfg, layout)


def _mesh(cfg):
  return sharding.make_mesh(cfg.mesh, jax.devices()[:cfg.mesh.data * cfg.mesh.fsdp])


def _batch(cfg, layout, seed):
  rs = np.random.RandomState(seed)
  b, (h, w), (hh, hw), k = cfg.train.batch_size, cfg.data.image_size, cfg.data.heatmap_size, 17
  ds = (np.arange(b) % 3).astype(np.int32)
  return dict(image=rs.randn(b, h, w, 3).astype(np.float32),
              target=rs.rand(b, k, hh, hw).astype(np.float32),
              target_weight=(rs.rand(b, k) > 0.3).astype(np.float32), dataset_index=ds,
              skeleton_mask=layout.skeleton_mask()[ds])


class _SGD:
  """A linear optimizer with the train step's optimizer interface (every group trains)."""

  def __init__(self, lr):
    self.lr = lr
    self.groups = optimizer.GROUPS

  def init(self, params):
    return {}

  def update(self, grads, opt_state, params, *, step, trainable):
    new = dict(params)
    for k, g in grads.items():
      new[k] = jax.tree_util.tree_map(lambda p, g: p - self.lr * g, params[k], g)
    return new, opt_state, {"grad_norm": optax.tree.norm(grads),
                            "learning_rate": jnp.float32(self.lr)}

  def group_learning_rates(self, step):
    return {g: jnp.float32(self.lr) for g in self.groups}


@dataclasses.dataclass(frozen=True)
class Run:
  initial: object  # State before the first step (host copy).
  states: list  # State after each step (host copies).
  metrics: list
  compiles_first_step: int  # XLA compilations during step 1 (the step itself, helpers).
  compiles_after_first_step: int  # XLA compilations during steps 2..N (0: compiled once).

  @property
  def final(self):
    return self.states[-1]


@functools.lru_cache(maxsize=None)
def _run(mesh_name, num_steps, sgd_lr=None, overrides=(), stage2=False, dtype="float32",
         detach=None, trainable=None) -> Run:
  """Runs `num_steps` steps; `stage2`: prototypes frozen and clustered, CPS and CSS on;
  `detach`: model.proto.detach_backbone (None: the config's); `trainable`: the groups that train (None: all)."""
  cfg, layout, model = _setup(mesh_name, dtype, detach)
  mesh = _mesh(cfg)
  state, _, shard, tx = loop.create_train_state(cfg, model, layout, mesh)
  if stage2:
    state = loop.cluster_state(cfg, state, shard)
  if sgd_lr is not None:
    tx = _SGD(sgd_lr)
    state, shard = state.replace(opt_state={}), shard.replace(opt_state={})
  scfg = loop.step_config(cfg, layout)
  if stage2:
    scfg = dataclasses.replace(scfg, update_prototypes=False, cps=True, css=True)
  scfg = dataclasses.replace(scfg, **dict(overrides))
  fn = step_lib.make_train_step(model, tx, scfg, mesh, shard, trainable=trainable)
  initial = jax.device_get(state)
  states, metrics = [], []
  # Counts XLA backend compilations (jit's own dispatch cache may add entries without one).
  compiles = []
  listener = lambda event, secs, **kw: compiles.append(event) if event == _COMPILE_EVENT else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for i in range(num_steps):
      if i == 1:
        after_first = len(compiles)
      state, m = fn(state, pipeline.to_global_batch(_batch(cfg, layout, i), mesh))
      states.append(jax.device_get(state))
      metrics.append(jax.device_get(m))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  after_first = after_first if num_steps > 1 else len(compiles)
  return Run(initial, states, metrics, after_first, len(compiles) - after_first)


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


_STATE_ARRAYS = ("params", "batch_stats", "prototypes", "cluster_prototypes", "cluster_keypoint")


def _assert_states_close(a, b, atol, names=_STATE_ARRAYS):
  for name in names:
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(getattr(a, name))[0],
                            jax.tree_util.tree_leaves(getattr(b, name))):
      np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5,
                                 err_msg=f"{name}{jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("mesh_name", ["8", "2x4"])
@pytest.mark.parametrize("stage2", [False, True], ids=["stage1_ema", "stage2_cps_css"])
def test_meshes_equal_one_device_sgd_three_steps(stage2, mesh_name):
  # Stage 1 includes the Gumbel-sampled EMA update of the prototypes over the global batch;
  # stage 2 the clustered table, CPS and CSS. data=8 is pure data parallelism; data=2 × fsdp=4
  # also shards the parameters (and the batch over all 8 devices).
  assert len(jax.devices()) == 8
  one = _run("1", 3, sgd_lr=0.05, stage2=stage2)
  other = _run(mesh_name, 3, sgd_lr=0.05, stage2=stage2)
  assert int(one.final.step) == int(other.final.step) == 3
  _assert_states_close(one.final, other.final, atol=2e-6)
  for a, b in zip(one.metrics, other.metrics):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)


def test_eight_devices_equal_one_device_adamw_step_and_compile_once():
  one = _run("1", 1)
  eight = _run("8", 3)
  # Three steps, one compilation (the listener does see the first one).
  assert eight.compiles_first_step >= 1 and eight.compiles_after_first_step == 0
  assert int(eight.final.step) == 3 and np.isfinite(eight.metrics[-1]["loss/total"])
  a, b = one.states[0], eight.states[0]
  _assert_states_close(a, b, atol=1e-6, names=("batch_stats", "prototypes", "cluster_prototypes"))
  for k in one.metrics[0]:
    np.testing.assert_allclose(one.metrics[0][k], eight.metrics[0][k], rtol=1e-5, err_msg=k)
  # Adam's first step is lr·g/(|g|+eps): a gradient that is float noise around zero (e.g. a conv
  # bias feeding BatchNorm) can flip sign between reduction orders. Allow that for a handful of
  # elements, bounded by 2·lr, and nothing more.
  lr0 = float(optimizer.learning_rate_schedule(synthetic.get_config("tiny").train)(0))
  off = total = 0
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a.params)[0],
                          jax.tree_util.tree_leaves(b.params)):
    off += int(np.sum(np.abs(x - y) > 1e-6 + 1e-5 * np.abs(x)))
    total += x.size
    assert np.all(np.abs(x - y) <= 2 * lr0 + 1e-6), jax.tree_util.keystr(path)
  assert off / total <= 2e-3, (off, total)
  assert any(np.abs(x - x0).max() > 0 for x, x0 in zip(jax.tree_util.tree_leaves(a.params),
                                                        jax.tree_util.tree_leaves(one.initial.params)))
  assert one.metrics[0]["lr/heads"] == pytest.approx(lr0)


def test_fsdp_shards_params_and_optimizer_state():
  sizes = {}
  for name in ("8", "2x4"):
    cfg, layout, model = _setup(name)
    state, _, shard, _ = loop.create_train_state(cfg, model, layout, _mesh(cfg))
    sizes[name] = (sharding.per_device_bytes(state.params),
                   sharding.per_device_bytes(state.opt_state))
    kernel = state.params["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # [32, 128]
    assert kernel.sharding == shard.params["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    mu = state.opt_state["backbone"].mu["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    if name == "2x4":  # Largest divisible dimension (128) on fsdp; moments alike.
      assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
      assert mu.sharding.spec == kernel.sharding.spec
      assert kernel.addressable_shards[0].data.shape == (32, 32)
    else:
      assert kernel.addressable_shards[0].data.shape == (32, 128)
  (p8, o8), (p24, o24) = sizes["8"], sizes["2x4"]
  assert p24 < 0.4 * p8 and o24 < 0.4 * o8, sizes
  assert sharding.fsdp_spec((3, 128, 8), 4, 64) == jax.sharding.PartitionSpec(None, "fsdp")
  assert sharding.fsdp_spec((30,), 4, 8) == jax.sharding.PartitionSpec()  # Not divisible.
  assert sharding.fsdp_spec((32, 32), 4, 2048) == jax.sharding.PartitionSpec()  # Small.


def test_prototypes_change_only_by_ema_and_only_with_target_pixels():
  run = _run("1", 3, sgd_lr=0.05)
  assert not np.allclose(run.initial.prototypes, run.final.prototypes)
  assert run.metrics[0]["proto/pixels"] > 0
  # No pixel passes the sampling threshold: the EMA has nothing to follow, and no gradient ever
  # reaches the prototypes, so they stay exactly as initialised.
  none = _run("1", 2, sgd_lr=0.01, overrides=(("sample_threshold", 2.0),))
  np.testing.assert_array_equal(none.initial.prototypes, none.final.prototypes)
  assert none.metrics[0]["proto/pixels"] == 0
  real = _run("1", 1)
  assert "prototypes" not in str(jax.tree_util.tree_structure(real.final.opt_state))


def test_stage2_freezes_prototypes_and_uses_the_clustered_table():
  run = _run("1", 3, sgd_lr=0.05, stage2=True)
  before, after, m = run.initial, run.final, run.metrics
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
  # No target pixel: both prototype losses (CE and prototype heatmaps) vanish, and the prototype
  # head gets no gradient at all, while the heatmap heads learn.
  none = _run("1", 2, sgd_lr=0.01, overrides=(("sample_threshold", 2.0),))
  for x, y in zip(jax.tree_util.tree_leaves(none.initial.params["proto_head"]),
                  jax.tree_util.tree_leaves(none.final.params["proto_head"])):
    np.testing.assert_array_equal(x, y)
  assert not np.allclose(none.initial.params["heads_0"]["final_layer"]["kernel"],
                         none.final.params["heads_0"]["final_layer"]["kernel"])
  run = _run("1", 3, sgd_lr=0.05)
  assert any(not np.allclose(x, y) for x, y in zip(
      jax.tree_util.tree_leaves(run.initial.params["proto_head"]),
      jax.tree_util.tree_leaves(run.final.params["proto_head"])))


def test_bfloat16_compute_keeps_float32_state_and_stays_close():
  # Spec §2.8: bf16 matmuls in backbone and heads; parameters, optimizer state, prototypes and
  # every loss in float32.
  f32, bf16 = _run("1", 1), _run("1", 1, dtype="bfloat16")
  for name in ("params", "opt_state", "batch_stats", "prototypes", "cluster_prototypes"):
    for x in jax.tree_util.tree_leaves(getattr(bf16.final, name)):
      assert x.dtype in (np.float32, np.int32), (name, x.dtype)
  for k, v in f32.metrics[0].items():
    if k.startswith("loss/") and abs(v) > 1e-6:
      assert abs(bf16.metrics[0][k] - v) <= 0.05 * abs(v) + 1e-6, (k, v, bf16.metrics[0][k])
  np.testing.assert_allclose(bf16.metrics[0]["grad_norm"], f32.metrics[0]["grad_norm"], rtol=0.1)
  assert bf16.metrics[0]["finite"]


def test_non_divisible_batch_fails_loudly():
  cfg, _, _ = _setup()
  mesh = sharding.make_mesh(cfg.mesh)
  with pytest.raises(ValueError, match="not divisible by 8 devices"):
    sharding.check_batch_size(12, mesh)


def _moved(before, after) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(before),
                                                      jax.tree_util.tree_leaves(after)))


@pytest.mark.parametrize("detach", [False, True], ids=["default", "detached"])
def test_prototype_loss_reaches_the_backbone_unless_detached(detach):
  # Only the prototype losses (heatmap weight 0): by default, as in the reference, their
  # gradients reach the backbone (model.proto.detach_backbone=False); detached, the backbone
  # must not move. The prototype head moves either way.
  from configs import posebh
  assert posebh.get_config("b").model.proto.detach_backbone is False  # The paper's configs.
  run = _run("1", 1, sgd_lr=0.1, overrides=(("heatmap_weight", 0.0),), detach=detach)
  assert _moved(run.initial.params["backbone"], run.final.params["backbone"]) == (not detach)
  assert _moved(run.initial.params["proto_head"], run.final.params["proto_head"])


@pytest.mark.parametrize("reference", [False, True], ids=["intended", "reference_6.14"])
def test_frozen_groups_run_in_eval_mode_unless_the_reference_switch(reference):
  # Stage 1 of PoseBH: only the prototype head trains. Intended: the frozen heads run in eval
  # mode, so their BatchNorm running statistics stay as they were; the reference (spec §6.14)
  # keeps them in train mode, updating the statistics of frozen heads.
  from posebh_jax.objective.compat import ReferenceCompat
  run = _run("1", 1, sgd_lr=0.1, trainable=("proto_head",),
             overrides=(("compat", ReferenceCompat(frozen_train_mode=reference)),))
  heads = lambda s: {k: v for k, v in s.batch_stats.items() if k.startswith("heads_")}
  assert heads(run.initial) and _moved(heads(run.initial), heads(run.final)) == reference
  assert not _moved(run.initial.params["heads_0"], run.final.params["heads_0"])
  assert _moved(run.initial.batch_stats["proto_head"], run.final.batch_stats["proto_head"])


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
