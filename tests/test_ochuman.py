"""OCHuman as an evaluation-only entry (data.eval_datasets) on ../shared/data/samples/ochuman:
its protocol goes through COCO's expert and head, and its TFDS build gives the records its file
gives. (Scores on the sample with the tiny reference weights: tests/test_eval_cli.py.)"""

from __future__ import annotations

import numpy as np

from conftest import shared_path
from configs import posebh as posebh_configs
from data_pipelines import build_tfds, datasets
from posebh_jax import experiment
from posebh_jax.evaluation import benchmark


def _config():
  config = posebh_configs.get_config("tiny_reference_samples")
  config.data.root = str(shared_path("data/samples"))
  return config


def test_protocol_predicts_with_cocos_expert_and_head():
  config = _config()
  files = experiment.resolve_dataset_files(config, "")
  plain = benchmark.dataset_protocols(config, files)  # Training's evaluation: the six only.
  assert "ochuman" not in [p.name for p in plain]
  (p,) = benchmark.dataset_protocols(config, files, ["ochuman"], with_eval_datasets=True)
  assert (p.name, p.index, p.metric, p.kind, p.boxes) == ("ochuman", 0, "coco_oks", "coco", "gt")
  assert p.record_slot == len(config.data.dataset_names)  # Its own slot, not COCO's.
  assert p.val_ann.endswith("ochuman/test_ochuman.json")


def test_tfds_build_of_the_eval_dataset_equals_its_file(tmp_path):
  config = _config()
  config.data.dataset_names = ("coco",)  # Build only COCO and OCHuman (no APT-36K sample).
  builds = {b.name: b for b in build_tfds.config_builds(config)}
  assert builds["ochuman"].format == "coco" and builds["ochuman"].num_keypoints == 17
  assert list(builds) == ["coco", "ochuman"] and set(builds["ochuman"].splits) == {"val"}
  layout = datasets.build_layout(config)
  files = experiment.resolve_dataset_files(config, "")
  protocols = benchmark.dataset_protocols(config, files, ["coco", "ochuman"],
                                          with_eval_datasets=True)
  from_files, _ = benchmark.load_eval_records(config, layout, files, protocols)
  build_tfds.build_config(config, str(tmp_path), log=lambda *_: None)
  config.data.tfds_dir = str(tmp_path)
  from_tfds, _ = benchmark.load_eval_records(config, layout, files, protocols)
  slot = protocols[1].record_slot
  assert len(from_files[slot]) == len(from_tfds[slot]) == 5
  assert len(from_files[0]) == len(from_tfds[0]) > 0  # COCO's own slot is separate.
  for a, b in zip(from_files[slot], from_tfds[slot]):
    np.testing.assert_array_equal(a["keypoints"], b["keypoints"])
    np.testing.assert_array_equal(a["center"], b["center"])
    assert a["image_id"] == b["image_id"]
