"""Pose prediction on your own images: a small API for Colab and scripts.

  from configs import posebh as posebh_configs
  from posebh_jax.inference import Predictor

  config = posebh_configs.get_config("b")
  predictor = Predictor.from_checkpoint(config, "/ckpt/posebh_b_converted")  # or a workdir
  poses = predictor.predict("street.jpg", boxes=[[10, 20, 120, 300]],
                            skeletons=("coco", "coco_wholebody", "ap10k"))
  for p in poses:
    print(p["skeleton"], p["box"], p["keypoints"].shape)   # [K, 3]: x, y, score (image px)

Any skeleton on any image: skeleton a is predicted with a's MoE expert and either a's heatmap
head (`through="head"`, the reference's per-dataset inference) or the prototype heatmaps of a's
keypoints (`through="prototypes"`, one embedding space for all skeletons, spec §2.4). So a COCO
photo can get COCO-WholeBody's 133 keypoints or AP-10K's animal keypoints. The crop, the flip
test and the decoding follow a's encoding (spec §5.1–§5.3); see `posebh_jax.evaluation.predict`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from data_pipelines import datasets, image_files, pipeline, storage, transforms
from posebh_jax import experiment
from posebh_jax.evaluation import predict as predict_lib

log = logging.getLogger("posebh")


class UnknownSkeletonError(ValueError):
  """A skeleton name that is neither a dataset nor a skeleton of the config."""


def skeleton_index(config: ml_collections.ConfigDict, name: str) -> int:
  """Dataset index of `name`: one of `data.dataset_names`, or the skeleton of one of them.

  Raises:
    UnknownSkeletonError: listing what the config's model predicts.
  """
  names = tuple(config.data.dataset_names)
  if name in names:
    return names.index(name)
  for d, (n, entry) in enumerate(zip(names, datasets.dataset_entries(config))):
    if datasets.entry_skeleton(n, entry).name == name:
      return d
  raise UnknownSkeletonError(f"unknown skeleton {name!r}; this model predicts {list(names)}")


def read_rgb(path: str | os.PathLike) -> np.ndarray:
  """The image at `path` (local or gs://) as RGB uint8 `[H, W, 3]`, read and decoded like every
  training image (`image_files`: bytes first, so any file name works; truncated files fail).

  Raises:
    pipeline.ImageError: the file is missing, unreadable or does not decode (the message names
      it).
  """
  path = os.fspath(path)
  shown = storage.display(path)
  try:
    data = storage.read_bytes(path)
  except OSError as e:
    raise pipeline.ImageError(f"cannot read image {shown}: "
                              f"{e.strerror or type(e).__name__}") from None
  image = image_files.decode_bgr(data)
  if image is None:
    raise pipeline.ImageError(f"cannot decode image {shown}: corrupt, truncated or empty "
                              f"({len(data)} bytes)")
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _as_rgb(image: np.ndarray | str | os.PathLike) -> np.ndarray:
  if isinstance(image, (str, os.PathLike)):
    return read_rgb(image)
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected an RGB uint8 image [H, W, 3] (or a path), got {image.dtype} "
                     f"{image.shape}")
  return image


def box_in_image(xywh: np.ndarray, size_hw: tuple[int, int], where: str = "image",
                 index: int = 0) -> bool:
  """Whether box `[x, y, w, h]` overlaps the `size_hw` image; warns (naming it) when not.

  A box wholly outside the image would be cropped from padding only and give keypoints far
  outside the image (e.g. x ≈ 5045 in a 640-pixel image): such boxes are skipped.
  """
  x, y, w, h = (float(v) for v in xywh)
  height, width = size_hw
  if x < width and y < height and x + w > 0 and y + h > 0:
    return True
  log.warning("%s: box %d [%g, %g, %g, %g] lies wholly outside the %dx%d image: skipped (no "
              "keypoints)", where, index, x, y, w, h, width, height)
  return False


def parse_box(box: Sequence[float], where: str = "box") -> tuple[np.ndarray, float]:
  """`[x, y, w, h]` or `[x, y, w, h, score]` → (float64 xywh `[4]`, score).

  Raises:
    ValueError: naming `where`, for a wrong length, non-finite values or a non-positive size.
  """
  try:
    values = np.asarray(box, np.float64).reshape(-1)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: expected [x, y, w, h] or [x, y, w, h, score], got {box!r}") \
        from None
  if values.size not in (4, 5) or not np.all(np.isfinite(values)):
    raise ValueError(f"{where}: expected 4 or 5 finite numbers [x, y, w, h(, score)], got {box!r}")
  if values[2] <= 0 or values[3] <= 0:
    raise ValueError(f"{where}: box width and height must be positive, got {box!r}")
  return values[:4], float(values[4]) if values.size == 5 else 1.0


class Predictor:
  """Top-down keypoints for boxes on images, for any of the config's skeletons.

  Args:
    config: the experiment config of the model (e.g. `configs/posebh.py:b`).
    params, batch_stats: the model's variables.
    prototypes: `[J, M, E]` keypoint prototypes (needed for `through="prototypes"` only).
    batch_size: crops per forward pass; an image with fewer boxes runs at the next power of
      two (see `core_for`), so each skeleton compiles at most log2(batch_size) + 1 times.
    flip_test: average with the flipped crop (spec §5.2; the reference's test setting).
    mesh: split batches over this mesh's `data` axis (the variables must be placed on it);
      None runs on the default device.
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any, batch_stats: Any,
               prototypes: jax.Array | None = None, *, batch_size: int = 8,
               flip_test: bool = True, mesh: Mesh | None = None):
    self.config = config
    self.layout = datasets.build_layout(config)
    self.model = experiment.build_model(config, self.layout)
    self.td_cfg = datasets.topdown_config(config, self.layout)
    self.dataset_names = tuple(config.data.dataset_names)
    self.params, self.batch_stats, self.prototypes = params, batch_stats, prototypes
    self.core = predict_lib.TopDownPredictor(self.model, self.td_cfg, batch_size=batch_size,
                                             flip_test=flip_test, mesh=mesh)
    self._small_cores: dict[int, predict_lib.TopDownPredictor] = {}

  @classmethod
  def from_checkpoint(cls, config: ml_collections.ConfigDict, path: str, *,
                      step: int | None = None, **kwargs: Any) -> "Predictor":
    """Loads converted weights (a `posebh-convert --out` directory) or a training workdir.

    Args:
      config: the config the weights were made for.
      path: converted weights directory, or a workdir holding `checkpoints/`.
      step: the workdir checkpoint to load (default: latest); not for converted weights.
      **kwargs: `Predictor` options (batch_size, flip_test, mesh).

    Raises:
      FileNotFoundError: nothing loadable at `path` (or no checkpoint `step`).
      CheckpointMismatchError: the weights belong to another model.
    """
    from posebh_jax.convert import weights as weights_lib
    from posebh_jax.train import sharding as sharding_lib

    layout = datasets.build_layout(config)
    model = experiment.build_model(config, layout)
    mesh = kwargs.get("mesh")
    placement = sharding_lib.replicated(mesh) if mesh is not None else None
    path = os.fspath(path)
    if (storage.is_dir(storage.join(path, "weights"))
        and storage.is_dir(storage.join(path, "meta"))):
      if step is not None:
        raise ValueError("step selects a workdir checkpoint; converted weights have none")
      w, _ = weights_lib.load_weights(
          path, model, num_prototype_keypoints=layout.total_keypoints,
          num_in_class=config.model.proto.num_in_class, sharding=placement)
      return cls(config, w.params, w.batch_stats, w.prototypes, **kwargs)
    if storage.is_dir(storage.join(path, "checkpoints")):
      params, batch_stats, prototypes = restore_checkpoint(config, path, step, mesh)
      return cls(config, params, batch_stats, prototypes, **kwargs)
    raise FileNotFoundError(f"{path}: neither converted weights (weights/ and meta/, as written "
                            "by posebh-convert) nor a workdir with checkpoints/")

  @classmethod
  def from_init(cls, config: ml_collections.ConfigDict, seed: int = 0,
                **kwargs: Any) -> "Predictor":
    """An untrained model (the config's initialisation): for demos and smoke tests where no
    checkpoint is at hand; its keypoints are meaningless.

    Args:
      config: the experiment config.
      seed: initialisation seed.
      **kwargs: `Predictor` options (batch_size, flip_test, mesh).
    """
    from posebh_jax.objective import prototypes as proto_lib

    layout = datasets.build_layout(config)
    model = experiment.build_model(config, layout)
    params_rng, drop_rng, proto_rng = jax.random.split(jax.random.key(seed), 3)
    h, w = config.data.image_size
    variables = jax.jit(lambda r1, r2: model.init(
        {"params": r1, "droppath": r2}, jnp.zeros((1, h, w, 3), jnp.float32),
        jnp.zeros((1,), jnp.int32), train=False))(params_rng, drop_rng)
    prototypes = (proto_lib.init_prototypes(proto_rng, layout.total_keypoints,
                                            config.model.proto.num_in_class,
                                            config.model.proto.out_channels)
                  if config.model.use_proto_head else None)
    return cls(config, variables["params"], variables.get("batch_stats", {}), prototypes,
               **kwargs)

  def skeleton_index(self, name: str) -> int:
    """Dataset index of `name`, a dataset name of the config or the name of its skeleton."""
    return skeleton_index(self.config, name)

  def predict(self, image: np.ndarray | str | os.PathLike,
              boxes: Sequence[Sequence[float]] | None = None,
              skeletons: Sequence[str] | None = None, *, through: str = "head",
              expert: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
    """Keypoints of every box for every requested skeleton.

    Boxes wholly outside the image are skipped with a warning naming them (and the image).

    Args:
      image: an image path or an RGB uint8 array `[H, W, 3]`.
      boxes: `[[x, y, w, h(, score)], ...]` in image pixels; None = one box, the whole image.
      skeletons: dataset (or skeleton) names, or one name; default all of the config's.
      through: "head" or "prototypes".
      expert: run the backbone with this dataset's expert for every skeleton (default: each
        skeleton's own).
      name: how warnings name the image (default: its path, or "image" for an array).

    Returns:
      Box-major list of dicts: instance (box position), box `[4]` (x, y, w, h), box_score,
      skeleton (dataset name), skeleton_type (skeleton name), keypoint_names `(K,)`,
      keypoints `[K, 3]` float32 (x, y, score) in image pixels, through.
    """
    rgb = _as_rgb(image)
    if isinstance(skeletons, str):  # predict(img, skeletons="coco"): one name, not 4 letters.
      skeletons = (skeletons,)
    names = self.dataset_names if skeletons is None else tuple(skeletons)
    indices = [self.skeleton_index(n) for n in names]  # Fail on a bad name before any work.
    expert_index = None if expert is None else self.skeleton_index(expert)
    if boxes is None:
      boxes = [[0.0, 0.0, float(rgb.shape[1]), float(rgb.shape[0])]]
    parsed = [parse_box(b, f"box {i}") for i, b in enumerate(boxes)]
    where = name or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else "image")
    kept = [i for i, (xywh, _) in enumerate(parsed)
            if box_in_image(xywh, rgb.shape[:2], where, i)]
    per_skeleton = {a: dict(zip(kept, self._predict_boxes(
        rgb, [parsed[i][0] for i in kept], a, through, expert_index))) if kept else {}
                    for a in dict.fromkeys(indices)}
    out = []
    for i, (xywh, score) in enumerate(parsed):
      if i not in kept:
        continue
      for name, a in zip(names, indices):
        skeleton = self.layout.skeletons[a]
        out.append(dict(instance=i, box=xywh.astype(np.float32), box_score=score,
                        skeleton=self.dataset_names[a], skeleton_type=skeleton.name,
                        skeleton_info=skeleton, keypoint_names=skeleton.keypoint_names,
                        keypoints=per_skeleton[a][i], through=through))
    return out

  def _predict_boxes(self, rgb: np.ndarray, boxes: list[np.ndarray], a: int, through: str,
                     expert: int | None) -> np.ndarray:
    """`[N, K_a, 3]` keypoints of skeleton a for the boxes of one image."""
    core = self.core_for(len(boxes))
    dec = core.decoding(a)
    w, h = self.td_cfg.image_size_wh
    boxes_cs = [transforms.box_to_center_scale(b, w / h, padding=self.config.data.bbox_padding)
                for b in boxes]

    def batches():
      bs = core.batch_size
      for start in range(0, len(boxes_cs), bs):
        chunk = boxes_cs[start:start + bs]
        yield (np.stack([predict_lib.crop_instance(rgb, c, s, dec) for c, s in chunk]),
               np.stack([c for c, _ in chunk]), np.stack([s for _, s in chunk]))
    return core.predict_crops(self.params, self.batch_stats, self.prototypes, batches(), a,
                              through=through, expert=expert)

  def core_for(self, num_boxes: int) -> predict_lib.TopDownPredictor:
    """The batched driver for an image with `num_boxes` boxes.

    Fewer boxes than `batch_size` run at the next power of two instead of padding to the full
    batch: one whole-image box at batch 8 would cost 8 forwards. That bounds the compilations
    per skeleton to log2(batch_size) + 1. On a mesh every batch must split over the devices, so
    there the full batch size is always used.
    """
    full = self.core.batch_size
    if num_boxes >= full or self.core.mesh is not None:
      return self.core
    size = min(full, 1 << max(0, num_boxes - 1).bit_length())
    if size not in self._small_cores:
      self._small_cores[size] = predict_lib.TopDownPredictor(
          self.model, self.td_cfg, batch_size=size, flip_test=self.core.flip_test)
    return self._small_cores[size]


def restore_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                       mesh: Mesh | None = None) -> tuple[Any, Any, jax.Array]:
  """(params, batch_stats, prototypes) of a training workdir's checkpoint (default: latest).

  Raises:
    FileNotFoundError: no checkpoints, or no checkpoint `step`.
    CheckpointMismatchError: the checkpoint belongs to another model or dataset mix.
  """
  from posebh_jax.train import restore

  state, _ = restore.restore_state(config, workdir, step, mesh)
  return state.params, state.batch_stats, state.prototypes
