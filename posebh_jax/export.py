"""A skeleton's crops → keypoints function as a serialized `jax.export` artifact (StableHLO).

The exported function is `predict.predict_keypoints` for one skeleton and route, flip test and
decoding included:

  keypoints [B, K, 3] = f(weights, crops [B, H, W, 3] float32, center [B, 2], scale [B, 2])

with crops cropped and normalised as `predict.crop_instance` does (a's UDP or standard affine,
ImageNet mean/std, RGB, NHWC) and keypoints (x, y, score) in image pixels. B is symbolic (any
batch size runs) unless a fixed `batch_size` is asked for.

The weights are arguments of the module, not constants in it: constants would make a ViT-H
module gigabytes of StableHLO, and XLA folds constants into the convolutions differently from
the live function, which moved DARK-UDP keypoints by up to a pixel on flat heatmaps; as
arguments the reloaded function computes exactly what the live one does.

One `.npz` file holds everything (no pickle): `exported` (the serialized module), `meta` (JSON:
skeleton, keypoint names, input shape, crop settings, ...) and the `weight_<i>` arrays.
Reloading needs only jax and numpy, no model code:

  predictor = posebh_jax.export.load_exported("coco_head.npz")
  keypoints = predictor(crops, center, scale)

Serialization needs the `flatbuffers` package (jax imports it lazily).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import storage, transforms
from posebh_jax.evaluation import predict as predict_lib

FORMAT = "posebh-jax exported predictor"
FORMAT_VERSION = 2


@dataclasses.dataclass
class ExportedPredictor:
  """A reloaded export: call it like the jitted predict function, without the model code.

  Attributes:
    exported: the deserialized `jax.export.Exported`.
    meta: the metadata written with it.
    weights: the weight arrays (on the default device) passed first to the module.
  """
  exported: jax.export.Exported
  meta: dict[str, Any]
  weights: list[jax.Array]
  _call: Callable[..., jax.Array] | None = dataclasses.field(default=None, repr=False)

  def __call__(self, crops: Any, center: Any, scale: Any) -> jax.Array:
    """`[B, H, W, 3]` crops, `[B, 2]` centres and scales → `[B, K, 3]` keypoints."""
    if self._call is None:  # One jit: each batch size compiles once, not per call.
      self._call = jax.jit(self.exported.call)
    return self._call(self.weights, jnp.asarray(crops, jnp.float32),
                      jnp.asarray(center, jnp.float32), jnp.asarray(scale, jnp.float32))


def export_predict_fn(model, dec: predict_lib.SkeletonDecoding, params: Any, batch_stats: Any,
                      prototypes: jax.Array | None, *, through: str = "head",
                      flip_test: bool = True, batch_size: int | None = None,
                      platforms: Sequence[str] | None = None
                      ) -> tuple[jax.export.Exported, list[np.ndarray]]:
  """Exports skeleton a's crops → keypoints function.

  Args:
    model, dec, params, batch_stats, prototypes, through, flip_test: as
      `predict.predict_keypoints`.
    batch_size: None for a symbolic batch dimension, else this fixed size.
    platforms: lowering platforms (e.g. ("cpu", "cuda", "tpu")); default the current backend.

  Returns:
    (exported, weights): the module and the float32 weight leaves to pass as its first argument.
  """
  h, w = dec.image_size_wh[1], dec.image_size_wh[0]
  batch = jax.export.symbolic_shape("b")[0] if batch_size is None else batch_size
  specs = (jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32),
           jax.ShapeDtypeStruct((batch, 2), jnp.float32),
           jax.ShapeDtypeStruct((batch, 2), jnp.float32))
  # The head route never reads the prototypes: leave them out of the artifact.
  variables = (params, batch_stats, prototypes if through == "prototypes" else None)
  leaves, treedef = jax.tree_util.tree_flatten(variables)

  def fn(weights, crops, center, scale):
    p, b, pr = jax.tree_util.tree_unflatten(treedef, weights)
    return predict_lib.predict_keypoints(model, dec, p, b, pr, crops, center, scale,
                                         through=through, flip_test=flip_test)
  weights = [np.asarray(x, np.float32) for x in leaves]
  weight_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in weights]
  exported = jax.export.export(jax.jit(fn), platforms=platforms)(weight_specs, *specs)
  return exported, weights


def _serialization_hint(e: ImportError) -> ImportError:
  return ImportError(f"jax.export serialization needs the flatbuffers package: pip install "
                     f"flatbuffers ({e})")


def save_exported(path: str | os.PathLike, exported: jax.export.Exported, meta: dict[str, Any],
                  weights: Sequence[np.ndarray]) -> str:
  """Writes the module, its metadata and the weights to one `.npz` file; returns the path."""
  path = os.fspath(path)
  meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, num_weights=len(weights),
              platforms=list(exported.platforms), jax_version=jax.__version__)
  try:
    blob = exported.serialize()
  except ImportError as e:
    raise _serialization_hint(e) from None
  arrays = dict(exported=np.frombuffer(blob, np.uint8),
                meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
  for i, x in enumerate(weights):
    arrays[f"weight_{i}"] = np.asarray(x)
  buf = io.BytesIO()  # A file object: np.savez would append ".npz" to a bare name.
  np.savez(buf, **arrays)
  # Atomic, local or gs://: a killed export never leaves a truncated artifact under `path`.
  storage.write_bytes(path, buf.getvalue())
  return path


def load_exported(path: str | os.PathLike) -> ExportedPredictor:
  """Reloads `save_exported`'s file; the weights are placed on the default device once.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not an exported predictor, or its weights do not fit its module
      (the message names the file).
  """
  path = os.fspath(path)
  if not storage.is_file(path):
    raise FileNotFoundError(f"no exported predictor at {path}")
  try:
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as data:
      meta = json.loads(data["meta"].tobytes().decode())
      if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format {meta.get('format')!r} version {meta.get('format_version')!r},"
                         f" expected {FORMAT!r} version {FORMAT_VERSION}")
      blob = bytearray(data["exported"].tobytes())
      weights = [data[f"weight_{i}"] for i in range(meta["num_weights"])]
  except (OSError, KeyError, ValueError, EOFError) as e:
    raise ValueError(f"{path} is not an exported posebh-jax predictor ({e})") from None
  try:
    exported = jax.export.deserialize(blob)
  except ImportError as e:
    raise _serialization_hint(e) from None
  want = exported.in_avals[:len(exported.in_avals) - 3]  # (weights..., crops, center, scale).
  got = [(tuple(w.shape), w.dtype) for w in weights]
  if [(tuple(a.shape), a.dtype) for a in want] != got:
    raise ValueError(f"{path}: the stored weights ({len(got)} arrays) do not fit the module "
                     f"({len(want)} weight arguments)")
  return ExportedPredictor(exported, meta, [jnp.asarray(w) for w in weights])


def export_skeleton(predictor, skeleton: str, path: str | os.PathLike, *, through: str = "head",
                    batch_size: int | None = None, platforms: Sequence[str] | None = None) -> str:
  """Exports one skeleton of an `inference.Predictor` (its weights and flip-test setting).

  Args:
    predictor: an `inference.Predictor`.
    skeleton: dataset (or skeleton) name, as `Predictor.predict` takes it.
    path: the `.npz` to write.
    through: "head" or "prototypes".
    batch_size: None = symbolic batch (any size runs); else only this size.
    platforms: lowering platforms; default the current backend.

  Returns:
    The path written.
  """
  a = predictor.skeleton_index(skeleton)
  dec = predictor.core.decoding(a)
  flip_test = predictor.core.flip_test
  exported, weights = export_predict_fn(
      predictor.model, dec, predictor.params, predictor.batch_stats, predictor.prototypes,
      through=through, flip_test=flip_test, batch_size=batch_size, platforms=platforms)
  info = predictor.layout.skeletons[a]
  w, h = dec.image_size_wh
  meta = dict(
      skeleton=predictor.dataset_names[a], skeleton_type=info.name,
      keypoint_names=list(info.keypoint_names), num_keypoints=dec.num_keypoints,
      input_shape=["b" if batch_size is None else batch_size, h, w, 3],
      batch="symbolic" if batch_size is None else "fixed", through=through, flip_test=flip_test,
      crop=dict(affine="udp" if dec.use_udp else "standard", image_size_wh=[w, h],
                heatmap_size_wh=list(dec.heatmap_size_wh),
                bbox_padding=float(predictor.config.data.bbox_padding),
                mean=transforms.IMAGENET_MEAN.tolist(), std=transforms.IMAGENET_STD.tolist(),
                layout="NHWC, RGB, (x / 255 - mean) / std"),
      output="[B, K, 3] (x, y, score) in image pixels")
  return save_exported(path, exported, meta, weights)
