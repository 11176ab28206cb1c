"""`model.bn_groups`: the heads' BatchNorm with per-group (per-device) batch statistics.

What is checked: the grouped layer equals an explicit numpy computation per group of
consecutive rows (outputs and running statistics); one group equals flax's `nn.BatchNorm`
(the default path, same variables); 8 groups give the same outputs and statistics on 1 device
and on a mesh of 8 (the batch sharded over 'data'), in the layer and in a real train step; the
option reaches the model from the config and a non-dividing value is a config error.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import synthetic
from data_pipelines import datasets, pipeline
from posebh_jax import config_checks, experiment
from posebh_jax.models import heads
from posebh_jax.train import loop, sharding, step as step_lib


def _numpy_grouped_bn(x, groups, scale, bias, eps=heads.BN_EPS):
  """Reference: each group of B / groups consecutive rows normalised with its own statistics."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  rows = x.shape[0] // groups
  means, variances = [], []
  for g in range(groups):
    part = x[g * rows:(g + 1) * rows]
    mean = part.mean(axis=(0, 1, 2))
    var = part.var(axis=(0, 1, 2))  # Biased, as BatchNorm normalises with.
    out[g * rows:(g + 1) * rows] = (part - mean) / np.sqrt(var + eps) * scale + bias
    means.append(mean)
    variances.append(var)
  return out, np.mean(means, axis=0), np.mean(variances, axis=0)


def _inputs(b=16, h=5, w=4, c=6, seed=0):
  rs = np.random.RandomState(seed)
  # Groups with clearly different statistics, so global and per-group normalisation differ.
  shift = np.repeat(rs.randn(8, 1, 1, c) * 3, b // 8, axis=0)
  return (rs.randn(b, h, w, c) * (1 + np.arange(c)) + shift).astype(np.float32)


def _init_and_set(module, x, seed=1):
  variables = module.init(jax.random.PRNGKey(0), x)
  rs = np.random.RandomState(seed)
  c = x.shape[-1]
  params = {"scale": jnp.asarray(1 + 0.1 * rs.randn(c), jnp.float32),
            "bias": jnp.asarray(0.1 * rs.randn(c), jnp.float32)}
  return {"params": params, "batch_stats": variables["batch_stats"]}


@pytest.mark.parametrize("groups", [2, 8])
def test_grouped_bn_equals_per_group_numpy(groups):
  x = _inputs()
  bn = heads.GroupedBatchNorm(groups)
  variables = _init_and_set(bn, x)
  y, mutated = bn.apply(variables, x, mutable=["batch_stats"])
  scale, bias = (np.asarray(variables["params"][k]) for k in ("scale", "bias"))
  want, group_mean, group_var = _numpy_grouped_bn(x, groups, scale, bias)
  np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-5)
  m = heads.BN_MOMENTUM
  np.testing.assert_allclose(mutated["batch_stats"]["mean"], (1 - m) * group_mean, atol=1e-5)
  np.testing.assert_allclose(mutated["batch_stats"]["var"], m + (1 - m) * group_var, rtol=1e-5)
  # The option changes the normalisation: the whole-batch result is different.
  whole, _, _ = _numpy_grouped_bn(x, 1, scale, bias)
  assert np.abs(whole - want).max() > 0.1


def test_one_group_is_flax_batchnorm_same_variables():
  x = _inputs()
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=heads.BN_MOMENTUM,
                         epsilon=heads.BN_EPS)
  ours = heads.GroupedBatchNorm(1)
  variables = _init_and_set(flax_bn, x)
  assert (jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(0), x))
          == jax.tree_util.tree_structure(flax_bn.init(jax.random.PRNGKey(0), x)))
  a, sa = flax_bn.apply(variables, x, mutable=["batch_stats"])
  b, sb = ours.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(a, b, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(sa["batch_stats"][k], sb["batch_stats"][k], rtol=1e-5, atol=1e-6)
  # Evaluation mode reads the running statistics exactly like nn.BatchNorm.
  trained = {"params": variables["params"], "batch_stats": sa["batch_stats"]}
  ev_flax = flax_bn.copy(use_running_average=True).apply(trained, x)
  ev_ours = ours.copy(use_running_average=True, groups=8).apply(trained, x)
  np.testing.assert_allclose(ev_flax, ev_ours, atol=1e-6)


def test_groups_must_divide_the_batch():
  bn = heads.GroupedBatchNorm(3)
  with pytest.raises(ValueError, match="groups=3 must divide the batch size 16"):
    bn.init(jax.random.PRNGKey(0), _inputs())


def test_eight_groups_equal_on_one_and_eight_devices():
  """Per device on 8 devices is 8 groups on 1 device: the grouping is by row, not by device."""
  assert len(jax.devices()) == 8
  x = _inputs()
  head = heads.HeatmapHead(5, deconv_filters=(8,), bn_groups=8)
  variables = head.init(jax.random.PRNGKey(0), x, train=False)
  fn = jax.jit(lambda v, x: head.apply(v, x, train=True, mutable=["batch_stats"]))
  one = fn(variables, x)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  x8 = jax.device_put(x, NamedSharding(mesh, P("data")))
  v8 = jax.device_put(variables, NamedSharding(mesh, P()))
  eight = fn(v8, x8)
  assert len(x8.sharding.device_set) == 8
  for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(eight)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  # And differs from the default (global statistics) on the same input.
  default = heads.HeatmapHead(5, deconv_filters=(8,))
  out_default, _ = default.apply(variables, x, train=True, mutable=["batch_stats"])
  assert np.abs(np.asarray(out_default) - np.asarray(one[0])).max() > 1e-4


def _step_result(mesh_data, bn_groups):
  cfg = synthetic.get_config("tiny")
  cfg.model.bn_groups = bn_groups
  cfg.mesh.data, cfg.mesh.fsdp = mesh_data, 1
  layout = datasets.build_layout(cfg)
  model = experiment.build_model(cfg, layout)
  assert model.bn_groups == bn_groups  # The config reaches the model.
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:mesh_data])
  state, _, shard, tx = loop.create_train_state(cfg, model, layout, mesh)
  fn = step_lib.make_train_step(model, tx, loop.step_config(cfg, layout), mesh, shard)
  rs = np.random.RandomState(0)
  b, (h, w), (hh, hw), k = cfg.train.batch_size, cfg.data.image_size, cfg.data.heatmap_size, 17
  ds = (np.arange(b) % 3).astype(np.int32)
  batch = dict(image=(rs.randn(b, h, w, 3) + np.arange(b)[:, None, None, None] * 0.3
                      ).astype(np.float32),
               target=rs.rand(b, k, hh, hw).astype(np.float32),
               target_weight=(rs.rand(b, k) > 0.3).astype(np.float32), dataset_index=ds,
               skeleton_mask=layout.skeleton_mask()[ds])
  state, metrics = fn(state, pipeline.to_global_batch(batch, mesh))
  return jax.device_get(state.batch_stats), jax.device_get(metrics)


def test_train_step_per_device_bn_equals_on_one_and_eight_devices():
  """The real step with `model.bn_groups=8` (batch 8: one row per group, i.e. per device on the
  8-device mesh) gives the same statistics and loss on 1 device as on data=8."""
  stats1, m1 = _step_result(1, 8)
  stats8, m8 = _step_result(8, 8)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(stats1)[0],
                          jax.tree_util.tree_leaves(stats8)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
  np.testing.assert_allclose(m1["loss/total"], m8["loss/total"], rtol=1e-5)


def test_config_check_names_a_bn_groups_that_does_not_divide_the_batch():
  cfg = synthetic.get_config("tiny")
  cfg.model.bn_groups = 3
  with pytest.raises(config_checks.ConfigError, match=r"model.bn_groups=3: must be a positive "
                     r"divisor of train.batch_size=8"):
    config_checks.check_config(cfg)
