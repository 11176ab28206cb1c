r"""A tiny PoseBH model on the mix of the five real sample datasets (a smoke run of real data).

`../shared/data/samples/` holds a few real images and annotations each of COCO (17 keypoints),
COCO-WholeBody (133), AI Challenger (14), MPII (16) and AP-10K (17). This config mixes all five
through the same pipeline, model and trainer as the real configs (`configs/posebh.py`): the
reference's per-dataset encodings and half-body settings, centre jitter, five experts and heads,
both PoseBH stages. Each sample has one annotation file, so training and evaluation read the
same file: the evaluation only shows that the path runs, not how well the model generalises.
The 4 steps take about a minute of CPU time on 2 cores (2 min 14 s wall on a shared machine),
nearly all of it compiling: one train step per stage and the evaluation's predictors.

From the annotation files directly (data.root is relative to the working directory):

  posebh-train --config=configs/samples.py --workdir=runs/samples

From TFDS ArrayRecord builds: build every dataset of the config once, then train on them:

  python -m data_pipelines.build_tfds --config=configs/samples.py:tfds
  posebh-train --config=configs/samples.py:tfds --workdir=runs/samples_tfds

Arguments: "tfds" reads the records from `data.tfds_dir` (default runs/samples_tfds). Override
the sample location with `--config.data.root=/path/to/samples`.
"""

from __future__ import annotations

import ml_collections

from configs import common

# (name, format = skeleton, annotations, image dir, encoding), relative to data.root; dataset
# index order as the reference's (spec §4.1, without APT-36K, which has no sample).
_SAMPLES = (
    ("coco", "coco", "coco/test_coco.json", "coco", "udp"),
    ("aic", "aic", "aic/test_aic.json", "aic", "msra"),
    ("mpii", "mpii", "mpii/test_mpii.json", "mpii", "udp"),
    ("ap10k", "ap10k", "ap10k/test_ap10k.json", "ap10k", "msra"),
    ("coco_wholebody", "coco_wholebody", "coco/test_coco_wholebody.json", "coco", "msra"),
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the sample-mix config (`arg`: "" or "tfds", see the module docstring)."""
  opts = common.parse_arg(arg, "configs/samples.py", options=("tfds",)).options
  config = common.base_config()
  data = config.data
  data.root = "../shared/data/samples"
  data.dataset_names = tuple(s[0] for s in _SAMPLES)
  for name, fmt, ann, image_dir, encoding in _SAMPLES:
    # Equal weights, not the reference's by-size proportions: AP-10K has 2 instances, COCO 12,
    # and every dataset should appear in a few-step run.
    data.datasets[name] = common.dataset_entry(
        skeleton=fmt, format=fmt, train_ann=ann, val_ann=ann, image_dir=image_dir,
        encoding=encoding, half_body=name != "mpii")
  data.center_jitter = True  # As the real configs (spec §4.3 step 4).
  if "tfds" in opts:
    data.tfds_dir = "runs/samples_tfds"

  # Test-sized model and crops (64×48 input, 16×12 heatmaps, batch 8, 4 steps).
  common.make_tiny(config)
  # 17 + 14 + 16 + 17 + 133 = 197 keypoints over the five skeletons → 64 cluster prototypes.
  config.model.proto.num_clusters = 64
  # Stage 2 (prototypes frozen and clustered, CPS, CSS) from step 2 of 4: both stages run.
  common.set_stage2(config, 2)
  config.train.checkpoint_every = 4
  config.train.learning_rate = 1e-3
  return config
