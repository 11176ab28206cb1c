r"""The embedded default: a small PoseBH-style model on synthetic multi-skeleton data.

Three synthetic "datasets" annotate different, partly overlapping keypoint sets in different
orders (a 17-point COCO-like human set, a 14-point AIC-like human set with neck and head top, and
a 17-point AP-10K-like quadruped set). The data is generated on first use under `data.root`.

Train then evaluate (about 10 minutes on 2 CPU cores):

  posebh-train --config=configs/synthetic.py --workdir=/tmp/posebh_synthetic

Any field can be overridden, e.g. a 2-minute smoke run:

  posebh-train --config=configs/synthetic.py --workdir=/tmp/smoke \
      --config.train.num_steps=100 --config.data.synthetic.num_train=300

The ViTPose++-style baseline (multi-head only) on the same data, for comparison:

  posebh-train --config=configs/synthetic.py:baseline --workdir=/tmp/posebh_synthetic_baseline

`get_config("tiny")` shrinks everything for tests; `steps=N` sets the run length (stage change
at 2/3). `posebh_b` is PoseBH-B with the reference's whole recipe (three phases of freeze hooks,
layer decay, step lr) on this data, compressed into `steps=N` steps (default 12; CPU: about a
minute per step):

  posebh-train --config=configs/synthetic.py:posebh_b,steps=12 --workdir=/tmp/posebh_b_synthetic
"""

from __future__ import annotations

import ml_collections

from configs import common
from configs import posebh as posebh_configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the synthetic default config.

  Args:
    arg: comma-separated options: "baseline" trains the ViTPose++-style multi-head model (no
      prototype head, no prototype losses, no CPS/CSS) on the same data; "tiny" shrinks
      everything for tests. E.g. `configs/synthetic.py:baseline,tiny`.
  """
  a = common.parse_arg(arg, "configs/synthetic.py", options=("baseline", "tiny", "posebh_b"),
                       values=("steps",))
  opts = a.options
  if "posebh_b" in opts:
    return _posebh_b(get_config("baseline" if "baseline" in opts else None),
                     a.values.get("steps", 12), baseline="baseline" in opts)
  config = common.base_config()

  # --- Data ---------------------------------------------------------------------------------------
  data = config.data
  data.root = ""  # Empty: <workdir>/synthetic_data.
  data.synthetic = ml_collections.ConfigDict(dict(
      enabled=True,
      num_train=1200,  # Images per dataset.
      num_val=150,
      seed=0,
      image_size=(192, 192),  # (H, W) of the rendered images.
      # Each dataset in its own look (render.STYLES): the COCO-like and AIC-like sets become
      # different domains (issue 18; benchmarks/synthetic_study.py). Off: one look for all.
      domain_styles=False,
  ))
  data.dataset_names = ("synth_coco", "synth_aic", "synth_ap10k")
  for name, encoding in (("synth_coco", "udp"), ("synth_aic", "msra"), ("synth_ap10k", "msra")):
    # Files are filled in from the generator's output when `synthetic.enabled`.
    data.datasets[name] = common.dataset_entry(
        skeleton=name, train_ann="", val_ann="", image_dir="", weight=1.0, encoding=encoding)
  # Side-view quadrupeds are the hardest of the three: sample them a little more often.
  data.datasets.synth_ap10k.weight = 2.5
  data.image_size = (128, 96)  # (H, W) of the network input crop.
  data.heatmap_size = (32, 24)  # (H, W): input / 4.
  # Left and right limbs differ in shade in the synthetic images; a horizontal flip would swap
  # the labels but not the shading and make left/right of side-view animals ambiguous.
  data.aug.flip = False
  # Milder augmentation than the reference recipe: minutes, not 100 epochs, of training.
  data.aug.half_body_prob = 0.0
  data.aug.rot_factor = 15.0
  data.aug.scale_factor = 0.15

  # --- Model ----------------------------------------------------------------------------------------
  model = config.model
  # Sized for a 2-core CPU: a 16×12 token grid as in ViTPose (patch 8 on 128×96), narrow width,
  # one deconv per head to the 32×24 heatmap; ~0.45 s per step at batch 16 on 2 cores.
  model.patch_size = 8
  model.patch_padding = 0
  model.embed_dim = 64
  model.depth = 4
  model.num_heads = 2
  model.part_features = 16
  model.drop_path_rate = 0.0
  model.head_deconv_filters = (32,)
  model.proto.deconv_filters = (16,)
  model.proto.channels = 16
  model.proto.out_channels = 16
  model.proto.gamma = 0.99  # Few steps: a faster EMA than the reference's 0.999.

  # --- Training -----------------------------------------------------------------------------------
  train = config.train
  train.batch_size = 16
  train.num_steps = 900
  train.learning_rate = 4e-3
  train.weight_decay = 1e-4
  train.warmup_steps = 50
  train.lr_schedule = "cosine"
  train.log_every = 50
  train.checkpoint_every = 200

  # Prototype clustering for CPS: 48 keypoints over the three skeletons -> 20 clusters (the
  # reference clusters 214 keypoints into 96).
  model.proto.num_clusters = 20

  # Loss weights. The reference's (1.25e-5 prototype CE, 3.33e-6 prototype heatmaps, 1e-3 CSS)
  # are tuned for fine-tuning a converged ViTPose++ with a frozen backbone; from scratch and for
  # a few hundred steps the prototype head needs gradients well above Adam's epsilon, and CSS
  # needs a weight that can move the heads. These weights were tuned with the prototype terms
  # training only the prototype head, so this recipe keeps it detached (the default,
  # model.proto.detach_backbone=False, lets them reach the backbone as the reference does);
  # phm 0.1 keeps its gradient from dominating the shared global-norm clip.
  model.proto.detach_backbone = True
  loss = config.loss
  loss.proto_weight = 1.0
  loss.phm_weight = 0.1
  loss.cps_weight = 0.1
  loss.css_weight = 0.1

  # Two stages as in the reference (spec §3.2), at 2/3 of the run instead of epoch 50 of 100:
  # prototypes EMA-updated first, then frozen, clustered (CPS) and used for CSS pseudo labels.
  common.set_stage2(config, 600)

  config.eval.batch_size = 64

  if "baseline" in opts:
    model.use_proto_head = False
    common.set_stage2(config, -1)

  if "tiny" in opts:
    common.make_tiny(config)
    data.synthetic.num_train = 24
    data.synthetic.num_val = 8
    data.synthetic.image_size = (96, 96)
    common.set_stage2(config, -1 if "baseline" in opts else 2)
  if "steps" in a.values:
    # The run's length; the stage change stays at 2/3 of it as in the default (600 of 900).
    config.train.num_steps = a.values["steps"]
    if config.model.use_proto_head:
      common.set_stage2(config, (2 * config.train.num_steps) // 3)
  return config


def _posebh_b(synthetic: ml_collections.ConfigDict, num_steps: int, *, baseline: bool
              ) -> ml_collections.ConfigDict:
  """PoseBH-B (or ViTPose++-B) exactly as `configs/posebh.py:b` builds it — model, optimizer
  (layer decay 0.75, step lr), loss weights, the three phases of freeze hooks, CPS/CSS — on the
  synthetic data, with the 100-epoch recipe compressed into `num_steps` steps
  (`posebh.scale_recipe`). Input 256×192 as the reference; batch 2 (CPU: about a minute per
  step). For checking the real recipe end to end, not for accuracy.
  """
  config = posebh_configs.get_config("vitpose_b" if baseline else "b")
  data = synthetic.data
  data.image_size, data.heatmap_size = config.data.image_size, config.data.heatmap_size
  data.center_jitter = False
  config.data = data
  config.model.proto.num_clusters = synthetic.model.proto.num_clusters  # 48 keypoints, not 214.
  config.eval = synthetic.eval
  config.eval.batch_size = 8
  config.train.batch_size = 2
  config.train.log_every = 1
  posebh_configs.scale_recipe(config, num_steps, "b")
  return config
