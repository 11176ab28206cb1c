"""Config checks that run before any data is read or anything compiles.

A bad value found here costs the user one line naming the field, not a traceback minutes later
(grain's batch-size error after the data is read, a ZeroDivisionError after the first step, an
XLA shape error while compiling, a keypoint-count mismatch at the final evaluation). The only
files read are skeleton JSON files and the head (or tail) of each annotation file, for its
keypoint count (`data_pipelines.annotation_info`).
"""

from __future__ import annotations


import ml_collections
from etils import epath

from data_pipelines import annotation_info, readers, storage
from data_pipelines.skeletons import (REAL_SKELETONS, SYNTHETIC_SKELETONS, SkeletonInfo,
                                      resolve_skeleton)


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def _positive(config: ml_collections.ConfigDict, *fields: str) -> None:
  for field in fields:
    value = config
    for part in field.split("."):
      value = value[part]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"{field}={value!r}: must be a positive number")


def _positive_or_off(config: ml_collections.ConfigDict, field: str) -> None:
  section, name = field.split(".")
  value = config[section].get(name, -1)
  if value == 0 or value < -1:
    raise ConfigError(f"{field}={value}: must be a positive number of steps, or -1 (off)")


def check_input_geometry(config: ml_collections.ConfigDict) -> None:
  """Input and heatmap sizes that the patch embedding and the upsampling heads can produce."""
  (h, w), p = tuple(config.data.image_size), config.model.patch_size
  if h % p or w % p:
    raise ConfigError(f"data.image_size={(h, w)}: each side must be a multiple of "
                      f"model.patch_size={p}")
  hp, wp = ((s + 2 * config.model.patch_padding - p) // p + 1 for s in (h, w))
  heads = [("model.head_deconv_filters", len(config.model.head_deconv_filters))]
  if config.model.use_proto_head:
    heads.append(("model.proto.deconv_filters", len(config.model.proto.deconv_filters)))
  want = tuple(config.data.heatmap_size)
  for field, n in heads:
    have = (hp * 2 ** n, wp * 2 ** n)
    if have != want:
      raise ConfigError(
          f"data.heatmap_size={want}: the {hp}x{wp} token grid of data.image_size={(h, w)} "
          f"upsampled by the {n} layer(s) of {field} gives {have}")


def check_annotation_counts(config: ml_collections.ConfigDict, name: str,
                            skeleton: SkeletonInfo) -> None:
  """The entry's annotation files hold as many keypoints as its skeleton (files that exist)."""
  entry = config.data.datasets[name]
  syn = config.data.get("synthetic")
  if (syn is not None and syn.enabled and isinstance(entry.skeleton, str)
      and entry.skeleton in SYNTHETIC_SKELETONS):
    return  # Rendered by the generator with exactly this skeleton.
  fmt = entry.get("format", "coco")
  for field in ("train_ann", "val_ann"):
    path = storage.join_root(config.data.root, entry.get(field, ""))
    if not path or not epath.Path(path).is_file():
      continue  # Missing files are named by the readers when they are read.
    have = annotation_info.keypoint_count(path, fmt)
    if have is not None and have != skeleton.num_keypoints:
      raise ConfigError(f"data.datasets.{name}.{field}: {path} holds {have} keypoints per "
                        f"instance but skeleton {skeleton.name!r} has {skeleton.num_keypoints}")


def check_datasets(config: ml_collections.ConfigDict, *, read_files: bool = True) -> None:
  """Every listed dataset has an entry, a valid skeleton (a known name, a mapping or a JSON
  file: flip pairs in range, one sigma per keypoint, ...) and format, and the keypoint count
  that its annotation format and (with `read_files`) its annotation files store."""
  names = tuple(config.data.dataset_names)
  if not names:
    raise ConfigError("data.dataset_names is empty: name at least one dataset")
  for name in names:
    if name not in config.data.datasets:
      raise ConfigError(f"data.dataset_names has {name!r} but data.datasets has no entry for "
                        f"it (known: {sorted(config.data.datasets.keys())})")
    entry = config.data.datasets[name]
    field = f"data.datasets.{name}"
    try:
      skeleton = resolve_skeleton(entry.skeleton, default_name=name)
    except ValueError as e:
      raise ConfigError(f"{field}.skeleton: {e}") from None
    fmt = entry.get("format", "coco")
    if fmt not in readers.FORMATS:
      raise ConfigError(f"{field}.format={fmt!r}: unknown annotation format; known: "
                        f"{list(readers.FORMATS)}")
    if fmt == "coco_wholebody" or (isinstance(entry.skeleton, str) and
                                   entry.skeleton in REAL_SKELETONS and fmt in REAL_SKELETONS):
      have = skeleton.num_keypoints
      want = REAL_SKELETONS[fmt].num_keypoints
      if have != want:
        raise ConfigError(f"{field}: skeleton {skeleton.name!r} has {have} keypoints but "
                          f"format {fmt!r} files hold {want}")
    if not isinstance(entry.get("weight", 1.0), (int, float)) or entry.get("weight", 1.0) < 0:
      raise ConfigError(f"{field}.weight={entry.get('weight')!r}: must be a number >= 0")
    if read_files:
      try:
        check_annotation_counts(config, name, skeleton)
      except OSError as e:
        raise ConfigError(f"{field}: cannot read its annotation file ({e})") from None


def check_eval_datasets(config: ml_collections.ConfigDict, *, read_files: bool = True) -> None:
  """Each `data.eval_datasets` entry exists, names a model dataset in `predict_with` and has
  that dataset's keypoint count (in its skeleton and its annotation files)."""
  names = tuple(config.data.dataset_names)
  for name in config.data.eval_datasets:
    field = f"data.datasets.{name}"
    if name not in config.data.datasets:
      raise ConfigError(f"data.eval_datasets has {name!r} but data.datasets has no entry for it")
    if name in names:
      raise ConfigError(f"data.eval_datasets has {name!r}, which is also in data.dataset_names "
                        f"(a model dataset is evaluated anyway)")
    entry = config.data.datasets[name]
    via = entry.get("predict_with", "")
    if via not in names:
      raise ConfigError(f"{field}.predict_with={via!r}: must name the dataset (of "
                        f"data.dataset_names {list(names)}) whose expert and head predict it")
    try:
      skeleton = resolve_skeleton(entry.skeleton, default_name=name)
      want = resolve_skeleton(config.data.datasets[via].skeleton, default_name=via)
    except ValueError as e:
      raise ConfigError(f"{field}.skeleton: {e}") from None
    if skeleton.num_keypoints != want.num_keypoints:
      raise ConfigError(f"{field}.skeleton: {skeleton.name!r} has {skeleton.num_keypoints} "
                        f"keypoints but {via!r}'s head predicts {want.num_keypoints}")
    fmt = entry.get("format", "coco")
    if fmt not in readers.FORMATS:
      raise ConfigError(f"{field}.format={fmt!r}: unknown annotation format; known: "
                        f"{list(readers.FORMATS)}")
    if read_files:
      try:
        check_annotation_counts(config, name, skeleton)
      except OSError as e:
        raise ConfigError(f"{field}: cannot read its annotation file ({e})") from None


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` (one line, naming the field) for values that cannot work.

  Cheap: touches no device; of the data it reads only skeleton files and a few MB of each
  annotation file (`check_datasets`).
  """
  _positive(config, "train.batch_size", "eval.batch_size", "train.log_every",
            "train.checkpoint_every", "train.keep_checkpoints")
  if config.train.num_steps < 0:
    raise ConfigError(f"train.num_steps={config.train.num_steps}: must be >= 0")
  _positive_or_off(config, "train.eval_every")
  if not config.train.learning_rate >= 0:  # Also catches NaN.
    raise ConfigError(f"train.learning_rate={config.train.learning_rate}: must be >= 0")
  groups = config.model.get("bn_groups", 1)
  if not (isinstance(groups, int) and groups >= 1 and config.train.batch_size % groups == 0):
    raise ConfigError(f"model.bn_groups={groups}: must be a positive divisor of "
                      f"train.batch_size={config.train.batch_size}")
  check_input_geometry(config)
  check_datasets(config)
  check_eval_datasets(config)
