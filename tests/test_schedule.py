"""The stage schedule (spec §3.2): freeze-hook bookkeeping incl. bug 6.8, and a run through three
stages (compiled once each, frozen groups untouched, Adam state fresh at thaw, resumable)."""

import jax
import numpy as np
import pytest

from configs import posebh, synthetic
from data_pipelines import datasets, pipeline
from posebh_jax import experiment
from posebh_jax.train import loop, schedule, sharding

B_BACKBONE = schedule.parse_events((("freeze", 0), ("freeze", 50), ("thaw", 90)), "b")
H_BACKBONE = schedule.parse_events((("freeze", 0), ("thaw", 90)), "h")


@pytest.mark.parametrize("compat", [False, True], ids=["intended", "reference_6.8"])
def test_freeze_hook_bookkeeping(compat):
  at = lambda events, step: schedule.group_trainable(events, step, reference_bookkeeping=compat)
  assert [at(B_BACKBONE, s) for s in (0, 49, 50, 89)] == [False] * 4
  assert at(B_BACKBONE, 90) == (not compat)  # 6.8: the second freeze locks the ViT-B backbone.
  assert at(H_BACKBONE, 89) is False and at(H_BACKBONE, 90) is True  # H thaws either way.
  heads = schedule.parse_events((("freeze", 0), ("thaw", 50)), "heads")
  assert (at(heads, 49), at(heads, 50)) == (False, True)
  assert at([], 0) and at([], 10 ** 6)


def test_posebh_b_config_expresses_the_reference_phases():
  c = posebh.get_config("b")
  e50, e90 = 50 * 1460, 90 * 1460
  assert c.train.lr_schedule == "step" and tuple(c.train.decay_steps) == (e50, e90)
  assert schedule.stage_boundaries(c) == [0, e50, e90]
  s0, s50, s90 = (schedule.stage_at(c, s) for s in (0, e50, e90))
  assert s0 == schedule.Stage(("proto_head",), update_prototypes=True, cps=False, css=False)
  assert s50 == schedule.Stage(("heads", "proto_head"), update_prototypes=False, cps=True, css=True)
  assert s90.trainable == ("backbone", "heads", "proto_head")
  assert schedule.stage_at(c, e50 - 1) == s0 and schedule.stage_at(c, e90 - 1) == s50
  c.reference_compat.freeze_hook_bookkeeping = True  # As released: backbone never trains.
  assert schedule.stage_boundaries(c) == [0, e50]
  assert schedule.stage_at(c, c.train.num_steps - 1).trainable == ("heads", "proto_head")
  h = posebh.get_config("h")
  h.reference_compat.freeze_hook_bookkeeping = True
  assert "backbone" in schedule.stage_at(h, e90).trainable
  assert schedule.thawed_at(posebh.get_config("b"), e90) == ("backbone",)
  assert schedule.thawed_at(posebh.get_config("b"), e50) == ("heads",)
  assert schedule.thawed_at(posebh.get_config("b"), e50 + 1) == ()
  # The schedule's flag is one of the compat switches, beside the step's.
  assert schedule.reference_compat(c).freeze_hook_bookkeeping
  assert not schedule.reference_compat(c).cps_topk_sort


@pytest.mark.parametrize("arg,compat", [("b", False), ("b", True), ("h", False)])
def test_stage_schedule_computed_once_equals_the_per_step_stages(arg, compat):
  # The loop looks stages up in a StageSchedule built once; it must agree with stage_at and
  # thawed_at on every step where anything could change, and the steps beside them.
  c = posebh.get_config(arg)
  c.reference_compat.freeze_hook_bookkeeping = compat
  stages = schedule.StageSchedule.from_config(c)
  e50, e90 = 50 * 1460, 90 * 1460
  steps = {0, 1, e50 - 1, e50, e50 + 1, e90 - 1, e90, e90 + 1, c.train.num_steps - 1}
  for step in sorted(steps):
    assert stages.at(step) == schedule.stage_at(c, step), step
    assert stages.thawed_at(step) == schedule.thawed_at(c, step), step
  assert len(set(stages.stages)) == len(stages.boundaries)


def test_synthetic_configs_keep_their_budget():
  for arg in (None, "baseline"):
    c = synthetic.get_config(arg)
    assert c.train.num_steps == 900 and c.train.lr_schedule == "cosine"
    assert c.train.layer_decay == 1.0
    for step in (0, 599, 600, 899):
      assert schedule.stage_at(c, step).trainable == ("backbone", "heads", "proto_head")


def test_bad_events_fail_before_training():
  c = synthetic.get_config("tiny")
  c.schedule.freeze_hooks.heads = ("freeze,0",)  # A string, not a ("freeze", <step>) pair.
  with pytest.raises(ValueError, match="schedule.freeze_hooks.heads: bad freeze-hook event"):
    loop.validate_config(c, datasets.build_layout(c))


def _tiny_three_stages():
  """Synthetic tiny with the reference's phases: 0-1 proto head, 2 + heads, 3 + backbone."""
  c = synthetic.get_config("tiny")
  c.mesh.data = 2
  c.schedule.freeze_hooks.heads = (("freeze", 0), ("thaw", 2))
  c.schedule.freeze_hooks.backbone = (("freeze", 0), ("freeze", 2), ("thaw", 3))
  c.train.lr_schedule, c.train.decay_steps = "step", (2, 3)
  return c


def _raw(x):
  """A leaf as a comparable array (typed PRNG keys as their key data)."""
  if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(x))
  return np.asarray(x)


def test_three_stage_run_compiles_once_per_stage_freezes_and_resumes():
  c = _tiny_three_stages()
  layout = datasets.build_layout(c)
  model = experiment.build_model(c, layout)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:2])
  state, _, shard, tx = loop.create_train_state(c, model, layout, mesh)
  steps = loop.StageSteps(c, layout, model, tx, mesh, shard)
  rs = np.random.RandomState(0)
  batches = []
  for _ in range(4):
    ds = (np.arange(8) % 3).astype(np.int32)
    batches.append(dict(
        image=rs.randn(8, 64, 48, 3).astype(np.float32),
        target=rs.rand(8, 17, 16, 12).astype(np.float32),
        target_weight=np.ones((8, 17), np.float32), dataset_index=ds,
        skeleton_mask=layout.skeleton_mask()[ds]))

  def run(state, start):
    hist = []
    for step in range(start, 4):
      state = loop.enter_step(c, state, step, tx, shard, steps.schedule)
      state, m = steps.run(step, state, pipeline.to_global_batch(batches[step], mesh))
      hist.append((jax.device_get(state), jax.device_get(m)))
    return state, hist

  init = jax.device_get(state)
  _, hist = run(state, 0)
  assert len(steps.compiled) == 3  # Stages at 0, 2, 3; steps 0 and 1 share one.
  assert all(f and f > 0 for f in steps.flops.values())  # XLA's count (for MFU).
  assert steps.flops_at(3) > steps.flops_at(0)  # Backbone and head gradients added.
  same = lambda a, b: all(np.array_equal(_raw(x), _raw(y)) for x, y in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
  s1, s2, s3 = hist[1][0], hist[2][0], hist[3][0]
  assert same(init.params["backbone"], s2.params["backbone"])  # Frozen through steps 0-2.
  assert not same(s2.params["backbone"], s3.params["backbone"])
  assert same(init.params["heads_1"], s1.params["heads_1"])
  assert not same(s1.params["heads_1"], s2.params["heads_1"])
  assert same(init.opt_state["backbone"], s2.opt_state["backbone"])  # Moments untouched.
  counts = {g: int(s3.opt_state[g].count) for g in ("backbone", "heads", "proto_head")}
  assert counts == {"backbone": 1, "heads": 2, "proto_head": 4}
  m0, m3 = hist[0][1], hist[3][1]
  assert m0["lr/backbone"] == 0 and m0["lr/heads"] == 0 and m0["lr/proto_head"] > 0
  assert m3["lr/backbone"] > 0
  np.testing.assert_allclose(m3["lr/proto_head"], c.train.learning_rate * 0.01, rtol=1e-6)
  assert np.all(s1.cluster_keypoint == -1) and np.all(s2.cluster_keypoint >= 0)

  # Resume after step 1 (mid-stage, before the thaw and the clustering): bit-identical.
  resumed = jax.tree_util.tree_map(jax.device_put, s1, shard)
  _, again = run(resumed, 2)
  assert len(steps.compiled) == 3
  for (a, ma), (b, mb) in zip(hist[2:], again):
    assert same(a, b)
    for k in ma:
      np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)
