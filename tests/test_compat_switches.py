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
from posebh_jax import experiment
from posebh_jax.compat import ReferenceCompat
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
  assert schedule.schedule_compat(c) is True  # 6.8 acts on the schedule ...
  assert schedule.step_compat(c).frozen_train_mode is True  # ... the others on the step.
  with pytest.raises(ValueError, match="unknown reference_compat flags"):
    ReferenceCompat.from_mapping({"frozen_train_mod": True})


def test_a_frozen_backbone_drops_no_paths():
  # 6.14's DropPath half, at the model: with stochastic depth on, a frozen backbone (eval mode)
  # gives the same features whatever the DropPath random bits; a training one does not.
  cfg = synthetic.get_config("tiny")
  cfg.model.drop_path_rate = 0.5
  layout = experiment.build_layout(cfg)
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
