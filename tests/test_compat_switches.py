"""The reference-compatibility switches (spec §6) in one place: `ReferenceCompat`.

Each switch's effect is tested where it acts (test_train_step for 6.14's BatchNorm statistics and
model.proto.detach_backbone, test_schedule for 6.8, the loss tests for 6.1-6.7); here: every
switch is a field of `ReferenceCompat`, the config's `reference_compat` section names exactly
those, `reference()` turns on all of them, and 6.14's DropPath half.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import posebh, synthetic
from data_pipelines import datasets, pipeline
from posebh_jax import experiment
from posebh_jax.objective.compat import ReferenceCompat
from posebh_jax.train import schedule


def test_one_place_for_every_switch_and_reference_turns_on_all():
  fields = {f.name for f in dataclasses.fields(ReferenceCompat)}
  assert {"freeze_hook_bookkeeping", "frozen_train_mode"} <= fields  # 6.8 and 6.14 included.
  for cfg in (posebh.get_config("b"), synthetic.get_config("tiny")):
    assert set(cfg.reference_compat) == fields
    assert ReferenceCompat.from_mapping(cfg.reference_compat) == ReferenceCompat()  # Intended.
  ref = ReferenceCompat.reference()
  assert all(getattr(ref, f) is True for f in fields)
  c = posebh.get_config("b")
  for f in fields:
    c.reference_compat[f] = True
  assert ReferenceCompat.from_mapping(c.reference_compat) == ref
  assert schedule.reference_compat(c) == ref  # The one reading of the config section.
  with pytest.raises(ValueError, match="unknown reference_compat flags"):
    ReferenceCompat.from_mapping({"frozen_train_mod": True})


def test_a_frozen_backbone_drops_no_paths():
  # 6.14's DropPath half, at the model: with stochastic depth on, a frozen backbone (eval mode)
  # gives the same features whatever the DropPath random bits; a training one does not.
  cfg = synthetic.get_config("tiny")
  cfg.model.drop_path_rate = 0.5
  layout = datasets.build_layout(cfg)
  model = experiment.build_model(cfg, layout)
  h, w = cfg.data.image_size
  images = jax.random.normal(jax.random.key(0), (2, h, w, 3))
  ds = jnp.array([0, 1], jnp.int32)
  variables = model.init({"params": jax.random.key(1)}, images, ds, train=False)

  def features(frozen, seed):
    out, _ = model.apply(variables, images, ds, train=True, frozen=frozen, mutable=["batch_stats"],
                         rngs={"droppath": jax.random.key(seed)})
    return np.asarray(out.features)
  np.testing.assert_array_equal(features(("backbone",), 0), features(("backbone",), 1))
  assert not np.array_equal(features((), 0), features((), 1))


def test_center_jitter_is_drawn_per_example_unless_at_build(tmp_path):
  # 6.15. Intended: records are read clean and the train transform draws the jitter for every
  # example (so each epoch sees another shift); reference: drawn once when reading, then fixed.
  cfg = synthetic.get_config("tiny")
  cfg.data.root = str(tmp_path / "data")
  layout = datasets.build_layout(cfg)
  files = experiment.resolve_dataset_files(cfg, str(tmp_path))
  clean, _ = datasets.load_records(cfg, layout, files, "train")
  cfg.data.center_jitter = True
  per_epoch, _ = datasets.load_records(cfg, layout, files, "train")
  td = datasets.topdown_config(cfg, layout)
  assert td.center_jitter == (True, True, True)
  cfg.reference_compat.center_jitter_at_build = True
  at_build, _ = datasets.load_records(cfg, layout, files, "train")
  assert datasets.topdown_config(cfg, layout).center_jitter == ()
  centers = lambda recs: np.array([r["center"] for d in recs for r in d])
  np.testing.assert_array_equal(centers(per_epoch), centers(clean))
  moved = np.any(centers(at_build) != centers(clean), axis=1)
  assert 0 < moved.mean() < 0.6  # ~30 % of the records, fixed for the run.

  # The transform: with every other augmentation off, two draws of one record differ only by
  # the jitter (probability 1 here); without it they are identical.
  still = dict(flip=False, half_body_prob=0.0, scale_factor=0.0, rot_prob=0.0,
               center_jitter_prob=1.0)
  record = clean[0][0]

  def joints(center_jitter, seed):
    t = pipeline.TopDownTrainTransform(dataclasses.replace(td, center_jitter=center_jitter,
                                                           **still))
    return t.random_map(record, np.random.default_rng(seed))["joints"]
  assert not np.array_equal(joints((True,) * 3, 0), joints((True,) * 3, 1))
  np.testing.assert_array_equal(joints((), 0), joints((), 1))
