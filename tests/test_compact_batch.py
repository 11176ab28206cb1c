"""Compact batches (the default): uint8 crops + crop-space joints from the host, normalisation and
MSRA/UDP targets inside the jitted step. Same losses and parameters as host-made float crops and
heatmaps on the same samples; a fraction of the bytes per sample."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import assert_params_close

from configs import synthetic
from data_pipelines import datasets, device_targets, pipeline
from data_pipelines.skeletons import SkeletonLayout, get_skeleton
from posebh_jax import experiment
from posebh_jax.train import loop, sharding, step as step_lib


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  cfg = synthetic.get_config("tiny")
  cfg.data.root = str(tmp_path_factory.mktemp("synthetic"))
  cfg.mesh.data = 8
  layout = datasets.build_layout(cfg)
  files = experiment.resolve_dataset_files(cfg, "")
  records, _ = datasets.load_records(cfg, layout, files, "train")
  return cfg, layout, records


def _batches(cfg, layout, records, host_targets, n):
  td = dataclasses.replace(datasets.topdown_config(cfg, layout), host_targets=host_targets)
  ds = pipeline.mixed_train_dataset(records, None, td, batch_size=cfg.train.batch_size,
                                    seed=cfg.seed)
  return td, [ds[i] for i in range(n)]


def test_default_config_ships_compact_batches(setup):
  cfg, layout, records = setup
  td, (batch,) = _batches(cfg, layout, records, not cfg.data.device_targets, 1)
  assert not td.host_targets
  assert batch["image"].dtype == np.uint8 and "target" not in batch
  assert batch["joints"].shape == (8, layout.max_keypoints, 2)


def test_device_targets_train_like_host_targets(setup):
  cfg, layout, records = setup
  model = experiment.build_model(cfg, layout)
  mesh = sharding.make_mesh(cfg.mesh)
  losses, params = {}, {}
  for host in (True, False):
    td, batches = _batches(cfg, layout, records, host, 2)
    state, _, shard, tx = loop.create_train_state(cfg, model, layout, mesh)
    fn = step_lib.make_train_step(model, tx, loop.step_config(cfg, layout), mesh, shard,
                                  targets=None if host else
                                  device_targets.TargetSpec.from_topdown(td))
    out = []
    for b in batches:
      state, m = fn(state, pipeline.to_global_batch(b, mesh))
      out.append(float(m["loss/total"]))
    losses[host], params[host] = out, jax.device_get(state.params)
  # The targets agree to float32 rounding (device_targets' docstring), the crops bit for bit.
  np.testing.assert_allclose(losses[False], losses[True], rtol=1e-5)
  assert_params_close(params[False], params[True], adam_steps=2,
                      learning_rate=cfg.train.learning_rate, rtol=1e-4)


def test_posebh_b_sample_is_under_200k_bytes():
  # PoseBH-B shapes: 256x192 crops, 64x48 heatmaps, K_max = 133 (COCO-WholeBody in the mix).
  layout = SkeletonLayout((get_skeleton("coco"), get_skeleton("coco_wholebody")))
  kp = np.zeros((133, 3), np.float32)
  kp[:, :2], kp[:, 2] = 100.0, 1.0
  rec = dict(keypoints=kp, center=np.float32([100, 100]), scale=np.float32([1.0, 1.33]),
             dataset_index=1)
  image = np.zeros((200, 200, 3), np.uint8)
  sizes = {}
  for host in (True, False):
    td = pipeline.TopDownConfig(layout=layout, encodings=("udp", "msra"),
                                image_size_hw=(256, 192), heatmap_size_hw=(64, 48),
                                host_targets=host)
    t = pipeline.TopDownTrainTransform(td)
    crop, joints, vis = t.augmented_crop(rec, image, np.random.default_rng(0))
    sizes[host] = sum(np.asarray(v).nbytes for v in t.example(1, crop, joints, vis).values())
  assert sizes[False] <= 200_000 < 2_000_000 < sizes[True]
