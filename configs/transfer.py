r"""Transfer of PoseBH-B to a dataset it never saw, as the reference's README "Transfer" section.

  posebh-train --config=configs/transfer.py:pw3d --workdir=runs/pw3d \
      --config.data.root=/data --config.init.weights=/ckpt/posebh_b_transfer
  posebh-train --config=configs/transfer.py:interhand2d --workdir=runs/interhand \
      --config.data.root=/data --config.init.weights=/ckpt/posebh_b_transfer

Arguments (comma separated): `pw3d` (3DPW, 24 SMPL joints, OKS AP; the reference's
configs/body/.../pw3d/vitb_posebh_pw3d_2d_256x192.py) or `interhand2d` (InterHand2.6M, one hand of
21 joints, PCK/AUC/EPE; configs/hand/.../interhand2d/vitb_posebh_interhand2d_256x192.py);
`steps_per_epoch=N` sets the epoch length the schedule is written in (default: the estimate in
`STEPS_PER_EPOCH`; set it to ceil(training instances / batch size) of your files); `tiny`
shrinks the model for tests.

The recipe, as both reference configs: ViT-B, one dataset with its own (fresh) heatmap head and
fresh keypoint prototypes (3 per keypoint), the prototype head (the keypoint embedding) taken from
the PoseBH checkpoint and frozen from epoch 0, prototypes EMA-updated until they freeze, the
backbone frozen and thawed (pw3d: frozen at 0, thawed at 15, frozen at 16; interhand: frozen at
0, thawed at 30), Adam with a 500-step linear warm-up and x0.1 steps (pw3d: lr 1e-4, epochs 10
and 15 of 30; interhand: lr 5e-4, epochs 35 and 55 of 60), no CSS (css_weight 0), no CPS
(the reference clusters nothing for one dataset), flip test.

Starting weights: the reference loads a PoseBH checkpoint whose prototypes were removed
(`tools/remove_proto.py`) into this one-dataset model. Derive them from converted PoseBH-B
weights (shared backbone, COCO's expert, the prototype head; no heads, no prototypes):

  python -m posebh_jax.convert.transfer --source_config=configs/posebh.py:b \
      --source=/ckpt/posebh_b_converted --config=configs/transfer.py:pw3d \
      --out=/ckpt/posebh_b_transfer
"""

from __future__ import annotations

import ml_collections

from configs import common
from configs import posebh as posebh_configs

# Estimated steps per epoch: training instances / the reference's global batch. 3DPW: ~22.7k
# training frames / 256 (4 GPUs x 64); InterHand2.6M (all, 5 fps): ~1.36M hands / 384 (4 x 96).
# The exact numbers depend on the annotation files: pass steps_per_epoch=N.
STEPS_PER_EPOCH = {"pw3d": 89, "interhand2d": 3545}

# Per dataset: files (relative to data.root), encoding, batch, lr, decay epochs, total epochs,
# prototype freeze epoch, backbone hooks (epochs), augmentation.
_RECIPES = {
    "pw3d": dict(
        skeleton="pw3d", format="coco", train_ann="pw3d/annotations/pw3d_train.json",
        val_ann="pw3d/annotations/pw3d_test.json", image_dir="pw3d/imageFiles",
        batch=256, lr=1e-4, decay=(10, 15), epochs=30, proto_freeze=15,
        backbone=(("freeze", 0), ("thaw", 15), ("freeze", 16)),
        aug=dict(flip=True, half_body_prob=0.3, num_joints_half_body=8, rot_factor=40.0,
                 scale_factor=0.5), half_body=True),
    "interhand2d": dict(
        skeleton="interhand2d", format="interhand2d",
        train_ann="interhand2.6m/annotations/all/InterHand2.6M_train_data.json",
        val_ann="interhand2.6m/annotations/all/InterHand2.6M_test_data.json",
        image_dir="interhand2.6m/images/train", val_image_dir="interhand2.6m/images/test",
        batch=384, lr=5e-4, decay=(35, 55), epochs=60, proto_freeze=30,
        backbone=(("freeze", 0), ("thaw", 30)),
        aug=dict(flip=True, half_body_prob=0.0, rot_factor=90.0, scale_factor=0.3),
        half_body=False),
}


def get_config(arg: str | None = "pw3d") -> ml_collections.ConfigDict:
  """Returns the transfer config (see the module docstring)."""
  a = common.parse_arg(arg or "pw3d", "configs/transfer.py", names=sorted(_RECIPES),
                       options=("tiny",), values=("steps_per_epoch",))
  if a.name is None:
    raise ValueError(f"configs/transfer.py: {arg!r} names no dataset; expected one of "
                     f"{sorted(_RECIPES)}")
  name = a.name
  r = _RECIPES[name]
  steps = a.values.get("steps_per_epoch", STEPS_PER_EPOCH[name])
  epoch = lambda e: common.epochs(e, steps)

  config = posebh_configs.get_config("b")  # ViT-B model, prototype head, loss weights.
  data = config.data
  data.dataset_names = (name,)
  data.datasets = ml_collections.ConfigDict()
  data.datasets[name] = common.dataset_entry(
      skeleton=r["skeleton"], format=r["format"], train_ann=r["train_ann"],
      val_ann=r["val_ann"], image_dir=r["image_dir"], val_image_dir=r.get("val_image_dir", ""),
      encoding="msra", half_body=r["half_body"])
  data.eval_datasets = ()
  data.center_jitter = r["format"] == "coco"
  data.aug.update(r["aug"])

  config.model.proto.num_in_class = 3
  config.loss.css_weight = 0.0
  config.loss.phm_weight = 1.25e-5  # The transfer configs' phm_loss_weight.

  train = config.train
  train.batch_size = r["batch"]
  train.learning_rate = r["lr"]
  train.weight_decay = 0.0  # Adam, not AdamW.
  train.warmup_steps = 500
  train.warmup_ratio = 1e-3
  train.lr_schedule = "step"
  train.decay_steps = tuple(epoch(e) for e in r["decay"])
  train.num_steps = epoch(r["epochs"])
  train.checkpoint_every = epoch(5)  # The reference's checkpoint_config interval.
  train.layer_decay = 1.0

  s = config.schedule
  s.proto_freeze_step = epoch(r["proto_freeze"])
  s.cps_start_step = -1
  s.css_start_step = -1
  s.freeze_hooks.proto_head = (("freeze", 0),)  # EmbFreezeThawHook: the embedding stays.
  s.freeze_hooks.heads = ()  # The new head trains throughout.
  s.freeze_hooks.backbone = tuple((what, epoch(e)) for what, e in r["backbone"])
  config.init.weights = ""

  if "tiny" in a.options:
    common.make_tiny(config)
    config.schedule.proto_freeze_step = 2
    config.schedule.freeze_hooks.backbone = (("freeze", 0), ("thaw", 2))
    config.train.decay_steps = (2, 3)
  return config

