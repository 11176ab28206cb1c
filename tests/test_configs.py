"""Experiment configs build the models and stage schedules they promise."""

import jax
import numpy as np
import pytest

from configs import posebh, synthetic
from data_pipelines import datasets
from posebh_jax import experiment
from posebh_jax.train import loop


@pytest.mark.parametrize("arg,dim,depth,heads,part", [
    ("s", 384, 12, 6, 96), ("b", 768, 12, 12, 192), ("l", 1024, 24, 16, 256),
    ("h", 1280, 32, 16, 320), ("vitpose_b", 768, 12, 12, 192), ("vitpose_h", 1280, 32, 16, 320)])
def test_posebh_sizes_and_layout(arg, dim, depth, heads, part):
  c = posebh.get_config(arg)
  m = c.model
  assert (m.embed_dim, m.depth, m.num_heads, m.part_features) == (dim, depth, heads, part)
  assert m.embed_dim % m.num_heads == 0
  layout = datasets.build_layout(c)
  assert layout.num_keypoints == (17, 14, 16, 17, 17, 133) and layout.total_keypoints == 214
  assert m.use_proto_head == (not arg.startswith("vitpose"))
  stage = c.schedule.cps_start_step
  if m.use_proto_head:  # Stage 2 at epoch 50 of 100 (spec §3.2).
    assert stage == c.train.num_steps // 2 == c.schedule.css_start_step == c.schedule.proto_freeze_step
  else:
    assert stage == -1


def test_posebh_b_parameter_count_matches_the_reference_manifest():
  # 150,927,702 elements in the reference state_dict (BN running stats and prototype tables
  # included, num_batches_tracked excluded).
  c = posebh.get_config("b")
  layout = datasets.build_layout(c)
  model = experiment.build_model(c, layout)
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "droppath": jax.random.key(1)},
      np.zeros((1, 256, 192, 3), np.float32), np.zeros((1,), np.int32), train=False))
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  protos = (214 + 96) * 3 * 64
  assert n + protos == 150_927_702


def test_stage_configs_follow_the_schedule():
  c = synthetic.get_config()
  layout = datasets.build_layout(c)
  base = loop.step_config(c, layout)
  s0, s1 = loop.stage_config(c, base, 599), loop.stage_config(c, base, 600)
  assert (s0.update_prototypes, s0.cps, s0.css) == (True, False, False)
  assert (s1.update_prototypes, s1.cps, s1.css) == (False, True, True)
  b = synthetic.get_config("baseline")
  sb = loop.stage_config(b, loop.step_config(b, layout), 800)
  assert not (sb.use_proto_head or sb.cps or sb.css or sb.update_prototypes)


def test_compat_flags_reach_the_step():
  c = synthetic.get_config("tiny")
  c.reference_compat.proto_logit_offset = True
  cfg = loop.step_config(c, datasets.build_layout(c))
  assert cfg.compat.proto_logit_offset and not cfg.compat.css_peak_distance


@pytest.mark.parametrize("module,arg", [(posebh, "x"), (synthetic, "tiny,bogus")])
def test_unknown_config_argument_fails(module, arg):
  with pytest.raises(ValueError, match="unknown"):
    module.get_config(arg)


def test_too_many_clusters_fail_before_training():
  c = synthetic.get_config("tiny")
  c.model.proto.num_clusters = 48  # = J: the reference skips C >= J.
  with pytest.raises(ValueError, match="num_clusters"):
    loop.validate_config(c, datasets.build_layout(c))


def test_synthetic_posebh_b_is_the_b_recipe_compressed_on_synthetic_data():
  c = synthetic.get_config("posebh_b,steps=12")
  b = posebh.get_config("b")
  for k in ("embed_dim", "depth", "num_heads", "part_features", "patch_size"):
    assert c.model[k] == b.model[k], k
  assert c.data.synthetic.enabled and c.data.dataset_names == ("synth_coco", "synth_aic",
                                                              "synth_ap10k")
  assert tuple(c.data.image_size) == (256, 192) and c.train.layer_decay == 0.75
  assert c.train.num_steps == 12 and tuple(c.train.decay_steps) == (6, 10)
  assert c.schedule.cps_start_step == c.schedule.css_start_step == 6
  assert tuple(c.schedule.freeze_hooks.backbone) == (("freeze", 0), ("freeze", 6), ("thaw", 10))
  assert tuple(c.schedule.freeze_hooks.heads) == (("freeze", 0), ("thaw", 6))
  base = synthetic.get_config("posebh_b,baseline")
  assert not base.model.use_proto_head and base.schedule.cps_start_step == -1
  short = synthetic.get_config("steps=30")
  assert short.train.num_steps == 30 and short.schedule.cps_start_step == 20
  with pytest.raises(ValueError, match="unknown or bad"):
    synthetic.get_config("steps=x")
