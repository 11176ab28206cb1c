"""The paper's evaluation protocol per dataset (spec §5.1), for `posebh-eval` and training.

Which metric a dataset gets is config data: its entry's annotation `format` (the same field the
readers dispatch on) maps to a protocol, and the skeleton of the entry gives the keypoints and
the OKS sigmas:

  format                                        metric     scored by
  coco, aic, ap10k, apt36k, coco_wholebody      coco_oks   coco_metrics.evaluate_dataset(format)
                                                           (rescoring + OKS-NMS, COCOeval with
                                                           xtcocotools' rules; WholeBody parts)
  mpii                                          pckh       mpii_metrics.mpii_pckh
  interhand2d                                   hand_pck   hand_metrics (PCK@0.2 of the box,
                                                           AUC over 0-30 px, EPE in px)
  synthetic data (`data.synthetic.enabled`)     pck_box    evaluator.PCKEvaluator (box-normalised
                                                           PCK, also across skeletons)

Boxes: the entry's `val_det` (detections; the reference uses them for COCO and COCO-WholeBody)
or the ground-truth boxes; `boxes="gt"` / `"det"` overrides the config for every selected
dataset. Predictions come from the dataset's own expert and head (`predict.TopDownPredictor`),
with the flip test when `eval.flip_test` (spec §5.1 runs every benchmark with it) and the
dataset's decoding (`encoding` "udp": UDP crop + DARK-UDP; "msra": standard crop + default decode
with `shift_heatmap`).

Every value is a fraction in [0, 1]: COCOeval's stats as pycocotools returns them, PCKh divided
by 100 (mpii_metrics reports percent, as the reference). COCOeval's -1 ("no ground truth in this
area range") is kept as -1. MPII without `mpii_gt_val.mat` (entry field `val_gt_mat`) uses the
head-segment approximation of the head size, and its keys say so (`approx_head/PCKh`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import ml_collections
import numpy as np
from jax.sharding import Mesh

from data_pipelines import coco_reader, pipeline, storage
from data_pipelines import datasets as datasets_lib  # `datasets` names the selection here.
from data_pipelines.skeletons import SkeletonLayout
from posebh_jax.evaluation import (coco_metrics, evaluator, hand_metrics, mpii_metrics,
                                   predict)

METRICS = ("coco_oks", "pckh", "pck_box", "hand_pck")
BOXES = ("config", "gt", "det")
_TABLE_COLUMNS = (("AP", "AP"), ("AP50", "AP .5"), ("AP75", "AP .75"), ("AR", "AR"))
_WHOLEBODY_COLUMNS = ("body", "foot", "face", "lefthand", "righthand", "wholebody")


class EvalSelectionError(ValueError):
  """A dataset selection or box choice that the config cannot satisfy (names what is wrong)."""


@dataclasses.dataclass(frozen=True)
class DatasetProtocol:
  """How one dataset is evaluated.

  Attributes:
    name: the dataset's name in `data.dataset_names`.
    index: its dataset index (expert, head, skeleton).
    metric: one of `METRICS`.
    kind: `coco_metrics.PROTOCOLS` key for "coco_oks" (the entry's format), "mpii" for "pckh",
      "" for "pck_box".
    val_ann: the ground-truth annotation file (resolved path).
    val_det: detection boxes (path relative to `data.root` as in the config), "" = GT boxes.
    val_gt_mat: MPII's `mpii_gt_val.mat` (resolved), "" = approximate head sizes.
  """

  name: str
  index: int
  metric: str
  kind: str
  val_ann: str
  val_det: str = ""
  val_gt_mat: str = ""
  # Position of its records in the evaluator's list: -1 = `index`; an entry of
  # `data.eval_datasets` (predicted with dataset `index`'s expert and head) has its own.
  slot: int = -1

  @property
  def boxes(self) -> str:
    return "det" if self.val_det else "gt"

  @property
  def record_slot(self) -> int:
    return self.index if self.slot < 0 else self.slot


def metric_for(entry: Mapping[str, Any], synthetic: bool) -> tuple[str, str]:
  """(metric, kind) of a dataset entry: the one mapping from config data to a protocol."""
  fmt = entry.get("format", "coco")
  if synthetic:  # Procedural data: box-normalised PCK, with cross-skeleton ground truth.
    return "pck_box", ""
  if fmt == "mpii":
    return "pckh", "mpii"
  if fmt == "interhand2d":  # PCK@0.2 of the box, AUC over 0-30 px, EPE (hand_metrics).
    return "hand_pck", "interhand2d"
  if fmt in coco_metrics.PROTOCOLS:
    return "coco_oks", fmt
  raise EvalSelectionError(f"dataset format {fmt!r} has no evaluation protocol (known: "
                           f"{sorted(coco_metrics.PROTOCOLS)} and 'mpii')")


def parse_datasets(arg: str | Sequence[str] | None) -> tuple[str, ...] | None:
  """`"coco,mpii"` (or a sequence) → names; None / "" / "all" → None (every dataset)."""
  if arg is None:
    return None
  names = [n.strip() for n in (arg.split(",") if isinstance(arg, str) else arg)]
  names = [n for n in names if n]
  return None if not names or names == ["all"] else tuple(names)


def dataset_protocols(config: ml_collections.ConfigDict, files: Sequence[Any],
                      datasets: Sequence[str] | None = None, boxes: str = "config", *,
                      with_eval_datasets: bool = False) -> list[DatasetProtocol]:
  """The protocols of the selected datasets, in dataset-index order.

  Args:
    config: the experiment config.
    files: `experiment.resolve_dataset_files(config, workdir)` (one per dataset, with
      `name` and resolved `val_ann`).
    datasets: names to evaluate; None = every dataset that has validation annotations.
    boxes: "config" (each entry's `val_det`), "gt" (ground-truth boxes everywhere) or "det"
      (detections; every selected dataset must have `val_det`).
    with_eval_datasets: also the entries of `data.eval_datasets` (posebh-eval), after the
      model's datasets, each with its `predict_with` dataset's index and a slot of its own.

  Raises:
    EvalSelectionError: an unknown name, a selected dataset without validation annotations,
      `boxes="det"` for a dataset without detections, or an unknown `boxes`.
  """
  if boxes not in BOXES:
    raise EvalSelectionError(f"boxes={boxes!r}; expected one of {BOXES}")
  names = tuple(config.data.dataset_names)
  extra = tuple(config.data.eval_datasets) if with_eval_datasets else ()
  if datasets is not None:
    unknown = [n for n in datasets if n not in names + extra]
    if unknown:
      raise EvalSelectionError(f"unknown dataset(s) {unknown}: the config has "
                               f"{list(names + extra)}")
  synthetic = bool(config.data.get("synthetic", {}).get("enabled", False))
  by_name = {f.name: f for f in files}
  out = []
  for d, name in enumerate(names):
    if datasets is not None and name not in datasets:
      continue
    entry, f = config.data.datasets[name], by_name[name]
    if not f.val_ann:
      if datasets is None:  # No validation data (e.g. APT-36K in the sample config).
        logging.getLogger("posebh").info("eval: %s has no val_ann; not evaluated", name)
        continue
      raise EvalSelectionError(f"dataset {name!r} has no validation annotations "
                               f"(data.datasets.{name}.val_ann is empty)")
    # Only generated data has the cross-skeleton ground truth of box-normalised PCK; another
    # dataset in a synthetic config is scored by its own format's protocol.
    metric, kind = metric_for(entry, synthetic and datasets_lib.is_generated(config, name, entry))
    det = entry.get("val_det", "")
    if boxes == "gt":
      det = ""
    elif boxes == "det" and not det:
      raise EvalSelectionError(f"--boxes=det: dataset {name!r} has no detection boxes "
                               f"(data.datasets.{name}.val_det is empty)")
    gt_mat = (storage.join_root(config.data.root, entry.get("val_gt_mat", ""))
              if metric == "pckh" else "")
    out.append(DatasetProtocol(name, d, metric, kind, f.val_ann, det, gt_mat))
  for j, name in enumerate(extra):
    if datasets is not None and name not in datasets:
      continue
    entry = config.data.datasets[name]
    d = names.index(entry.predict_with)  # Checked by config_checks.check_eval_datasets.
    f = datasets_lib.entry_files(config, name)
    metric, kind = metric_for(entry, False)
    det = "" if boxes == "gt" else entry.get("val_det", "")
    if boxes == "det" and not det:
      raise EvalSelectionError(f"--boxes=det: dataset {name!r} has no detection boxes "
                               f"(data.datasets.{name}.val_det is empty)")
    out.append(DatasetProtocol(name, d, metric, kind, f.val_ann, det, slot=len(names) + j))
  return out


def load_eval_records(config: ml_collections.ConfigDict, layout: SkeletonLayout,
                      files: Sequence[Any], protocols: Sequence[DatasetProtocol]
                      ) -> tuple[list[Sequence[dict[str, Any]]], list[Any]]:
  """Validation records of the selected datasets with their protocol's boxes.

  Reads through `datasets_lib.load_records` (annotation files or TFDS, by format) on a copy of the
  config narrowed to the selected datasets, so unselected ones (possibly without files) are
  never opened.

  Returns:
    (records per protocol slot (`DatasetProtocol.record_slot`: the dataset index, then the
    `data.eval_datasets`), [] for unselected ones; the read reports of the selected ones).
    The records' `dataset_index` is their position among the selected datasets: the predictor
    takes the skeleton index explicitly and never reads it.
  """
  num_slots = max([layout.num_datasets] + [p.record_slot + 1 for p in protocols])
  if not protocols:
    return [[] for _ in range(num_slots)], []
  sub = config.copy_and_resolve_references()
  with sub.unlocked():
    sub.data.dataset_names = tuple(p.name for p in protocols)
    for p in protocols:
      sub.data.datasets[p.name].val_det = p.val_det
  sub_layout = SkeletonLayout(tuple(layout.skeletons[p.index] for p in protocols))
  by_name = {f.name: f for f in files}
  sub_files = [by_name[p.name] if p.slot < 0 else datasets_lib.entry_files(config, p.name)
               for p in protocols]
  recs, reports = datasets_lib.load_records(sub, sub_layout, sub_files, "val")
  records: list[Sequence[dict[str, Any]]] = [[] for _ in range(num_slots)]
  for p, r in zip(protocols, recs):
    records[p.record_slot] = r
  return records, reports


@dataclasses.dataclass
class DatasetResult:
  """One dataset's scores.

  Attributes:
    name, metric, boxes: as the protocol.
    num_instances: boxes evaluated (before OKS-NMS).
    values: metric name → value (fractions; see the module docstring).
    note: a caveat printed under the table (e.g. approximated MPII head sizes), or "".
  """

  name: str
  metric: str
  boxes: str
  num_instances: int
  values: dict[str, float]
  note: str = ""


@dataclasses.dataclass
class EvalResults:
  datasets: list[DatasetResult]
  pairs: list[evaluator.PairResult]  # Box-normalised PCK pairs (synthetic data), incl. cross.


class BenchmarkEvaluator:
  """Runs each selected dataset's protocol; the jitted predict functions compile once.

  Args:
    model: the `PoseBHModel`.
    layout: the config's skeleton layout (all datasets).
    config: the experiment config (`eval.batch_size`, `eval.flip_test`, `eval.pck_thresholds`).
    td_cfg: the top-down config (per-dataset encodings → crop and decoding).
    mesh: device mesh the batches are split over.
    protocols: `dataset_protocols(...)`.
    val_records: records per dataset index (`load_eval_records` or the loop's validation
      records, which must have been read with the protocols' boxes).
  """

  def __init__(self, model: nn.Module, layout: SkeletonLayout,
               config: ml_collections.ConfigDict, td_cfg: pipeline.TopDownConfig, mesh: Mesh,
               protocols: Sequence[DatasetProtocol],
               val_records: Sequence[Sequence[Mapping[str, Any]]]):
    self.layout, self.config, self.protocols = layout, config, list(protocols)
    self.val_records = val_records
    ev = config.eval
    self.flip_test = bool(ev.flip_test)
    self.predictor = predict.TopDownPredictor(model, td_cfg, batch_size=ev.batch_size,
                                              flip_test=self.flip_test, mesh=mesh)
    pck_idx = {p.index for p in self.protocols if p.metric == "pck_box"}
    self.pck = None
    if pck_idx:
      self.pck = evaluator.PCKEvaluator(
          model, layout, config.data.dataset_names,
          [r if d in pck_idx else [] for d, r in enumerate(val_records)], td_cfg, mesh,
          batch_size=ev.batch_size, thresholds=ev.pck_thresholds, flip_test=self.flip_test)

  def run(self, params: Any, batch_stats: Any, results_dir: str | None = None) -> EvalResults:
    """Evaluates `params` / `batch_stats` on every selected dataset.

    `results_dir`: where each COCO-style dataset's result JSON (`<name>_keypoints.json`, as
    mmpose's `result_keypoints.json`) is written; None: not written.
    """
    out, pairs = [], []
    for p in self.protocols:
      records = self.val_records[p.record_slot]
      if p.metric == "pck_box":
        continue
      if not len(records):
        raise EvalSelectionError(f"dataset {p.name!r}: no usable validation instances in "
                                 f"{p.val_det or p.val_ann}")
      preds = self.predictor.predict_records(params, batch_stats, None, records, p.index)
      if p.metric == "coco_oks":
        path = None
        if results_dir is not None:
          storage.makedirs(results_dir)
          path = storage.join(results_dir, f"{p.name}_keypoints.json")
        out.append(score_coco(p, self.layout, preds, path))
      elif p.metric == "hand_pck":
        out.append(DatasetResult(p.name, "hand_pck", p.boxes, len(preds),
                                 hand_metrics.score_records(records, preds)))
      else:
        out.append(score_mpii(p, preds, records))
    if self.pck is not None:
      pairs = self.pck.run(params, batch_stats)
      for r in pairs:
        if r.images == r.skeleton:
          out.append(DatasetResult(r.images, "pck_box", "gt", r.num_instances, dict(r.pck)))
    order = {p.name: i for i, p in enumerate(self.protocols)}
    out.sort(key=lambda r: order[r.name])
    return EvalResults(out, pairs)


def keypoint_predictions(preds: Sequence[Mapping[str, Any]]
                         ) -> list[coco_metrics.KeypointPrediction]:
  """`predict.prediction_record` dicts → `coco_metrics.KeypointPrediction`s."""
  fields = ("image_id", "category_id", "keypoints", "center", "scale", "area", "bbox_score",
            "bbox_id")
  return [coco_metrics.KeypointPrediction(**{k: p[k] for k in fields}) for p in preds]


def score_coco(protocol: DatasetProtocol, layout: SkeletonLayout,
               preds: Sequence[Mapping[str, Any]], results_path: str | None = None
               ) -> DatasetResult:
  """COCO-style OKS AP/AR of one dataset's predictions (its skeleton's sigmas)."""
  sigmas = np.asarray(layout.skeletons[protocol.index].sigmas, np.float64)
  values = coco_metrics.evaluate_dataset(protocol.kind, protocol.val_ann,
                                         keypoint_predictions(preds), sigmas,
                                         results_path=results_path)
  return DatasetResult(protocol.name, "coco_oks", protocol.boxes, len(preds), values)


def mpii_ground_truth(protocol: DatasetProtocol, records: Sequence[Mapping[str, Any]]
                      ) -> tuple[mpii_metrics.MpiiGroundTruth, list[int]]:
  """MPII ground truth for `records` and the bbox ids that order predictions like it.

  With `val_gt_mat` the official file (all validation instances: none may have been skipped);
  otherwise the annotation JSON's kept entries with approximated head sizes.
  """
  ann_ids = [int(r["ann_id"]) for r in records]
  if protocol.val_gt_mat:
    return mpii_metrics.load_mpii_gt_mat(protocol.val_gt_mat), ann_ids
  entries = coco_reader.load_json(protocol.val_ann, required=())
  kept = sorted(set(ann_ids))
  gt = mpii_metrics.mpii_gt_from_json([entries[i] for i in kept], approximate_headboxes=True)
  position = {a: i for i, a in enumerate(kept)}
  return gt, [position[a] for a in ann_ids]


def score_mpii(protocol: DatasetProtocol, preds: Sequence[Mapping[str, Any]],
               records: Sequence[Mapping[str, Any]]) -> DatasetResult:
  """MPII PCKh@0.5 / @0.1 (as fractions) of one dataset's predictions."""
  gt, bbox_ids = mpii_ground_truth(protocol, records)
  keypoints = np.stack([p["keypoints"] for p in preds])  # [N, 16, 3]
  try:
    stats = mpii_metrics.mpii_pckh(keypoints, gt, bbox_ids)
  except ValueError as e:
    raise ValueError(f"dataset {protocol.name!r} ({protocol.val_gt_mat or protocol.val_ann}): "
                     f"{e}") from None
  values = {k: (v if k.endswith("skipped_instances") else v / 100.0) for k, v in stats.items()}
  note = ""
  if gt.headbox_source == mpii_metrics.HEADBOX_APPROX:
    note = (f"* {protocol.name}: head size approximated by the head segment (no mpii_gt_val.mat"
            f" in data.datasets.{protocol.name}.val_gt_mat): close to, not, the official PCKh")
  return DatasetResult(protocol.name, "pckh", protocol.boxes, len(preds), values, note)


# ----------------------------------------------------------------------------------------------
# Table, JSON, TensorBoard
# ----------------------------------------------------------------------------------------------


def _fmt(v: float | None, width: int = 7) -> str:
  if v is None:
    return f"{'-':>{width}}"
  if v < 0:  # COCOeval's "no ground truth in range".
    return f"{'n/a':>{width}}"
  return f"{v:>{width}.3f}"


def pckh_values(values: Mapping[str, float]) -> tuple[float | None, float | None, bool]:
  """(PCKh, PCKh@0.1, approximated) from an MPII result's values."""
  if "PCKh" in values:
    return values["PCKh"], values["PCKh@0.1"], False
  return values.get("approx_head/PCKh"), values.get("approx_head/PCKh@0.1"), True


def _pair_table(results: Sequence[evaluator.PairResult], thresholds: Sequence[float]) -> str:
  """A table: one row per (images, skeleton) pair, PCK at each threshold."""
  cols = [f"PCK@{t:g}" for t in thresholds]
  head = f"{'images':<14} {'skeleton':<14} {'n':>5} " + " ".join(f"{c:>9}" for c in cols)
  head += "   novel keypoints only"
  lines = [head, "-" * len(head)]
  for r in results:
    vals = " ".join(f"{r.pck[f'pck@{t:g}']:>9.3f}" for t in thresholds)
    nov = ""
    if r.pck_novel is not None:
      nov = "   " + " ".join(f"{r.pck_novel[f'pck@{t:g}']:.3f}" for t in thresholds)
    lines.append(f"{r.images:<14} {r.skeleton:<14} {r.num_instances:>5} {vals}{nov}")
  return "\n".join(lines)


def format_table(results: EvalResults, thresholds: Sequence[float] = (0.05, 0.1)) -> str:
  """Paper-style tables: datasets × (AP AP50 AP75 AR | PCKh PCKh@0.1), WholeBody parts, PCK."""
  lines = []
  main = [r for r in results.datasets if r.metric in ("coco_oks", "pckh")]
  if main:
    head = (f"{'dataset':<16} {'boxes':<5} {'n':>5} " +
            " ".join(f"{c:>7}" for c, _ in _TABLE_COLUMNS) + f" {'PCKh':>8} {'PCKh@0.1':>9}")
    lines += [head, "-" * len(head)]
    for r in main:
      if r.metric == "coco_oks":
        vals = " ".join(_fmt(r.values[k]) for _, k in _TABLE_COLUMNS)
        tail = f" {'-':>8} {'-':>9}"
      else:
        p, p1, approx = pckh_values(r.values)
        mark = "*" if approx else " "
        vals = " ".join(_fmt(None) for _ in _TABLE_COLUMNS)
        tail = f" {_fmt(p, 7)}{mark} {_fmt(p1, 8)}{mark}"
      lines.append(f"{r.name:<16} {r.boxes:<5} {r.num_instances:>5} {vals}{tail}")
    lines += [r.note for r in main if r.note]
  wholebody = [r for r in results.datasets if "wholebody/AP" in r.values]
  if wholebody:
    head = f"{'WholeBody AP':<16} " + " ".join(f"{c:>9}" for c in _WHOLEBODY_COLUMNS)
    lines += ["", head, "-" * len(head)]
    for r in wholebody:
      lines.append(f"{r.name:<16} " + " ".join(_fmt(r.values[f"{c}/AP"], 9)
                                                for c in _WHOLEBODY_COLUMNS))
  hands = [r for r in results.datasets if r.metric == "hand_pck"]
  if hands:
    head = f"{'hands':<16} {'boxes':<5} {'n':>5} {'PCK@0.2':>8} {'AUC':>7} {'EPE px':>7}"
    lines += (["", head] if lines else [head]) + ["-" * len(head)]
    for r in hands:
      lines.append(f"{r.name:<16} {r.boxes:<5} {r.num_instances:>5} {_fmt(r.values['PCK'], 8)} "
                   f"{_fmt(r.values['AUC'])} {r.values['EPE']:>7.2f}")
  if results.pairs:
    if lines:
      lines.append("")
    lines.append("PCK normalised by box size:")
    lines.append(_pair_table(results.pairs, thresholds))
  return "\n".join(lines)


def metrics_dict(results: EvalResults, step: int) -> dict[str, Any]:
  """The JSON document of `write_metrics`."""
  # NaN (e.g. PCKh of a joint no instance annotates, as the reference) → null: strict JSON.
  finite = lambda v: v if math.isfinite(v) else None
  per_dataset = {r.name: dict(metric=r.metric, boxes=r.boxes, num_instances=r.num_instances,
                              **{k: finite(v) for k, v in r.values.items()})
                 for r in results.datasets}
  cross = {f"{r.images}->{r.skeleton}": dict(num_instances=r.num_instances, **r.pck,
                                             novel=r.pck_novel)
           for r in results.pairs if r.images != r.skeleton}
  return dict(step=step, per_dataset=per_dataset, cross_skeleton=cross)


def write_metrics(results: EvalResults, out_dir: str, step: int) -> str:
  """Writes `<out_dir>/metrics_<step>.json` (atomically; local or gs://) and returns its path."""
  path = storage.join(out_dir, f"metrics_{step}.json")
  storage.write_text(path, json.dumps(metrics_dict(results, step), indent=2, allow_nan=False))
  return path


def tensorboard_scalars(results: EvalResults) -> dict[str, float]:
  """`eval/<dataset>/<metric>` → value for every finite value (tags in [A-Za-z0-9_./-])."""
  def tag(key: str) -> str:  # "AP .5" → "AP5", "AP (M)" → "AP_M", "PCKh@0.1" → "PCKh_0.1".
    key = key.replace(" .", "").replace(" (", "_").replace(")", "").replace("@", "_")
    return re.sub(r"[^A-Za-z0-9_./-]", "_", key)

  out = {}
  for r in results.datasets:
    for k, v in r.values.items():
      if math.isfinite(v):
        out[f"eval/{r.name}/{tag(k)}"] = float(v)
  for r in results.pairs:
    if r.images != r.skeleton:
      for k, v in r.pck.items():
        out[f"eval/{r.images}_on_{r.skeleton}/{tag(k)}"] = float(v)
  return out
