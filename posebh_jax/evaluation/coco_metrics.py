"""COCO-style keypoint metrics exactly as the reference evaluates them (spec §5.1, §5.4, §5.5).

Per benchmark (`evaluate_dataset`):

  KeypointPrediction per box ─ rescore_and_nms (§5.4 steps 1-3) ─ results_json (step 4)
    ─ coco_keypoint_eval / wholebody_keypoint_eval (§5.5) → {"AP": …, "AR (L)": …}

The reference scores with xtcocotools 1.14.x, which does not install with numpy 2 here, so the
evaluation runs pycocotools' `COCOeval` and reproduces every place where xtcocotools' keypoint
evaluation differs from it (checked line by line against xtcocotools 1.14.3's `coco.py` /
`cocoeval.py`); the OKS formula, matching, accumulation and summary are the same code in both:

1. Ignored ground truth: xtcocotools ignores an instance that is crowd or has no evaluated
   keypoint with `v > 0`, *counting* them in the keypoint array; pycocotools reads the
   `num_keypoints` field. The ground-truth copy we evaluate carries the count in that field.
2. xtcocotools' loader sets a missing `iscrowd` to False (AIC files have none); so does our copy.
3. Detections none of whose evaluated keypoints has a score `> 0` are dropped before matching
   (xtcocotools `_prepare`); pycocotools would keep them.
4. `use_area=False` (AIC): OKS scale and area ranges use `0.53 · w · h` of the ground-truth box
   instead of its `area` → `_BoxAreaCOCOeval`, a one-method override.
5. WholeBody iouTypes `keypoints_{body,foot,face,lefthand,righthand,wholebody}`: each run
   evaluates the part's fields (all five concatenated for whole-body) with the sigma slice; the
   ground truth keeps the person's `area` and `bbox`; a detection's `area`/`bbox` come from its
   body `keypoints` field for every part (xtcocotools `loadRes` looks only at `keypoints`).
6. Matching bookkeeping: xtcocotools ≥ 1.13 marks "unmatched" with -1, pycocotools with 0, so a
   ground-truth annotation with id 0 only works in xtcocotools: such files are renumbered 1..N
   here (ids are used only as match identities). Negative ids (where xtcocotools itself would
   count matches as false positives) are rejected.

Not reproduced (unused by the reference): xtcocotools' part-specific detection scores
(`foot_score`, … — mmpose writes only `score`, which xtcocotools then uses for every part) and
the CrowdPose `keypoints_crowd` summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data_pipelines.coco_reader import (WHOLEBODY, WHOLEBODY_PART_SIZES, AnnotationError,
                                        load_json)
from data_pipelines import storage
from data_pipelines.skeletons import get_skeleton
from posebh_jax.evaluation.nms import oks_nms, rescore_instances, soft_oks_nms

STATS_NAMES = ('AP', 'AP .5', 'AP .75', 'AP (M)', 'AP (L)', 'AR', 'AR .5', 'AR .75', 'AR (M)',
               'AR (L)')

# xtcocotools' WholeBody iouTypes in the order mmpose runs them; the last is the reported one.
WHOLEBODY_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (name, (field,)) for name, field in zip(('body', 'foot', 'face', 'lefthand', 'righthand'),
                                            WHOLEBODY.keypoint_fields)) + (
                                                ('wholebody', WHOLEBODY.keypoint_fields),)

GroundTruth = str | os.PathLike | Mapping[str, Any] | COCO


# ----------------------------------------------------------------------------------------------
# Prediction records, rescoring, OKS-NMS and the result file (spec §5.3 step 5, §5.4)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeypointPrediction:
  """One top-down prediction: a decoded pose and the box record it was cropped from.

  Arrays are stored as float32 and the scalars as float32 values, like the reference's
  `preds` / `boxes` arrays, so rescoring and OKS-NMS round exactly as it does.

  Attributes:
    image_id: COCO image id.
    category_id: category of the box (1 for people; for AP-10K/APT-36K the ground-truth
      annotation's category, spec §5.4 step 4).
    keypoints: `[K, 3]` (x, y, score) in image pixels.
    center: `[2]` box centre (x, y) in image pixels.
    scale: `[2]` box size / 200 (mmpose units).
    area: box-record area `s_x · s_y · 200²` (spec §5.3 step 5), the OKS-NMS scale.
    bbox_score: detector (or 1 for ground-truth boxes) score.
    bbox_id: id of the box; predictions sharing (image_id, bbox_id) are duplicates (padding of
      the distributed sampler) and only the first is kept.
    score: instance score after `rescore_and_nms` (None before).
  """

  image_id: int
  category_id: int
  keypoints: np.ndarray
  center: np.ndarray
  scale: np.ndarray
  area: float
  bbox_score: float
  bbox_id: int
  score: float | None = None

  def __post_init__(self):
    for name in ('image_id', 'category_id', 'bbox_id'):  # numpy ints are not JSON-serialisable.
      if isinstance(getattr(self, name), np.integer):
        object.__setattr__(self, name, int(getattr(self, name)))
    where = f'prediction (image_id {self.image_id!r}, bbox_id {self.bbox_id!r})'
    kpts = np.asarray(self.keypoints, dtype=np.float32)
    if kpts.ndim != 2 or kpts.shape[1] != 3:
      raise ValueError(f'{where}: keypoints must be [K, 3] (x, y, score), got shape '
                       f'{kpts.shape}')
    if not np.isfinite(kpts).all():
      bad = sorted(set(np.argwhere(~np.isfinite(kpts))[:, 0].tolist()))
      raise ValueError(f'{where}: non-finite keypoint values at keypoints {bad}')
    object.__setattr__(self, 'keypoints', kpts)
    for name in ('center', 'scale'):
      v = np.asarray(getattr(self, name), dtype=np.float32).reshape(-1)
      if v.shape != (2,) or not np.isfinite(v).all():
        raise ValueError(f'{where}: {name} must be 2 finite values, got {getattr(self, name)!r}')
      object.__setattr__(self, name, v)
    for name in ('area', 'bbox_score') + (('score',) if self.score is not None else ()):
      v = np.float32(getattr(self, name))
      if not np.isfinite(v):
        raise ValueError(f'{where}: {name} is not finite ({getattr(self, name)!r})')
      object.__setattr__(self, name, v)


def _check_keypoint_count(predictions: Sequence[KeypointPrediction], k: int) -> None:
  for i, p in enumerate(predictions):
    if p.keypoints.shape[0] != k:
      raise ValueError(f'prediction {i} (image_id {p.image_id!r}, bbox_id {p.bbox_id!r}) has '
                       f'{p.keypoints.shape[0]} keypoints, expected {k}')


def rescore_and_nms(predictions: Sequence[KeypointPrediction], sigmas: np.ndarray, *,
                    vis_thr: float = 0.2, oks_thr: float = 0.9, soft_nms: bool = False,
                    use_nms: bool = True) -> list[KeypointPrediction]:
  """Dedupe, rescore and OKS-NMS the predictions of every image (spec §5.4 steps 1-3).

  Per image (images in order of first appearance, as the reference's dict): sort by `bbox_id`
  and keep the first of each run of equal ids; `score = kpt_score · bbox_score` with
  `kpt_score` the mean keypoint score over scores `> vis_thr` (0 if none); then greedy OKS-NMS
  (`oks_thr`, box-record areas, `sigmas`) or, with `soft_nms`, Gaussian soft OKS-NMS (at most
  20 per image).

  Args:
    predictions: decoded predictions, any order, possibly with duplicates.
    sigmas: `[K]` OKS sigmas of the dataset.
    vis_thr: keypoint-score threshold of the rescoring.
    oks_thr: OKS threshold of the NMS.
    soft_nms: use soft OKS-NMS instead of greedy suppression.
    use_nms: False keeps every (deduplicated) prediction.

  Returns:
    Kept predictions with `score` set, grouped by image, in NMS keep order.
  """
  sigmas = np.asarray(sigmas, dtype=np.float64)
  _check_keypoint_count(predictions, len(sigmas))
  by_image: dict[Any, list[KeypointPrediction]] = {}
  for p in predictions:
    by_image.setdefault(p.image_id, []).append(p)
  kept = []
  for preds in by_image.values():
    preds = sorted(preds, key=lambda p: p.bbox_id)  # Stable, like the reference's `sorted`.
    preds = [p for j, p in enumerate(preds) if j == 0 or p.bbox_id != preds[j - 1].bbox_id]
    keypoints = np.stack([p.keypoints for p in preds])
    scores = rescore_instances(keypoints, np.array([p.bbox_score for p in preds], np.float32),
                               vis_thr)
    preds = [dataclasses.replace(p, score=s) for p, s in zip(preds, scores)]
    if use_nms:
      db = [{'keypoints': p.keypoints, 'score': p.score, 'area': p.area} for p in preds]
      nms = soft_oks_nms if soft_nms else oks_nms
      preds = [preds[i] for i in nms(db, oks_thr, sigmas=sigmas)]
    kept.extend(preds)
  return kept


def results_json(instances: Sequence[KeypointPrediction], kind: str,
                 num_keypoints: int | None = None) -> list[dict[str, Any]]:
  """COCO keypoint result records as the reference writes them (spec §5.4 step 4).

  Args:
    instances: output of `rescore_and_nms` (every `score` set).
    kind: dataset kind (see `evaluate_dataset`): people get category 1, AP-10K/APT-36K the
      record's `category_id`; COCO-WholeBody's 133 values are split into `keypoints` (body 17),
      `foot_kpts`, `face_kpts`, `lefthand_kpts`, `righthand_kpts`.
    num_keypoints: keypoints per instance (a config-defined skeleton's); default the kind's
      skeleton's.

  Returns:
    One dict per instance with `image_id`, `category_id`, the flattened (x, y, score) keypoint
    lists, `score`, `center`, `scale` (JSON-serialisable).
  """
  protocol = _protocol(kind)
  _check_keypoint_count(instances, num_keypoints or get_skeleton(protocol.skeleton).num_keypoints)
  cuts = np.cumsum((0,) + WHOLEBODY_PART_SIZES) * 3
  out = []
  for i, p in enumerate(instances):
    if p.score is None:
      raise ValueError(f'instance {i} (image_id {p.image_id!r}, bbox_id {p.bbox_id!r}) has no '
                       f'score: run rescore_and_nms first')
    flat = p.keypoints.reshape(-1)
    record = {'image_id': p.image_id,
              'category_id': int(p.category_id) if protocol.gt_category else 1}
    if protocol.wholebody:
      for j, field in enumerate(WHOLEBODY.keypoint_fields):
        record[field] = flat[cuts[j]:cuts[j + 1]].tolist()
    else:
      record['keypoints'] = flat.tolist()
    record.update(score=float(p.score), center=p.center.tolist(), scale=p.scale.tolist())
    out.append(record)
  return out


# ----------------------------------------------------------------------------------------------
# COCOeval with xtcocotools' keypoint semantics (spec §5.5)
# ----------------------------------------------------------------------------------------------


class _BoxAreaCOCOeval(COCOeval):
  """xtcocotools' `use_area=False`: the ground-truth scale is `0.53 · w · h` of its box.

  xtcocotools uses `bbox[3] · bbox[2] · 0.53` in `computeOks` and `bbox[2] · bbox[3] · 0.53`
  for the area ranges in `evaluateImg` (the same float: products are commutative); those are
  exactly the two places where pycocotools reads `gt['area']`, so replacing the area of the
  prepared ground truth is the whole difference.
  """

  def _prepare(self):
    super()._prepare()
    for key, gts in self._gts.items():
      self._gts[key] = [{**g, 'area': g['bbox'][3] * g['bbox'][2] * 0.53} for g in gts]


def _quiet(fn, *args):
  """Runs a pycocotools call with its progress prints swallowed."""
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*args)


def _coco(dataset: dict[str, Any]) -> COCO:
  coco = COCO()
  coco.dataset = dataset
  _quiet(coco.createIndex)
  return coco


def _gt_dataset(gt: GroundTruth) -> tuple[dict[str, Any], str]:
  """(COCO dict, name for messages) of a path, a dict or a pycocotools COCO object."""
  if isinstance(gt, COCO):
    return gt.dataset, 'ground truth (COCO object)'
  if isinstance(gt, Mapping):
    source = 'ground truth (dict)'
    if any(k not in gt for k in ('images', 'annotations', 'categories')):
      raise AnnotationError(f"{source}: needs 'images', 'annotations' and 'categories'")
    return dict(gt), source
  path = os.fspath(gt)
  return load_json(path, required=('images', 'annotations', 'categories')), path


def _gt_coco(dataset: dict[str, Any], source: str, fields: Sequence[str], num_keypoints: int,
             use_area: bool) -> COCO:
  """Ground truth with the evaluated fields as `keypoints` and xtcocotools' ignore inputs."""
  ids = [ann.get('id') if isinstance(ann, Mapping) else None for ann in dataset['annotations']]
  renumber = 0 in ids  # pycocotools' "0 = unmatched" would drop matches to id 0 (module doc 6).
  anns = []
  for i, ann in enumerate(dataset['annotations']):
    where = f'{source}: annotation {ids[i]!r} (#{i})'
    if not isinstance(ann, Mapping):
      raise AnnotationError(f'{where} is not a record')
    for key in ('id', 'image_id', 'category_id', 'bbox', *fields):
      if key not in ann:
        raise AnnotationError(f'{where} has no {key!r}')
    if isinstance(ann['id'], (int, np.integer)) and ann['id'] < 0:
      raise AnnotationError(f'{where}: negative annotation ids are not supported')
    if use_area and 'area' not in ann:
      raise AnnotationError(f"{where} has no 'area' (needed unless use_area=False, as for AIC)")
    kpts = [v for field in fields for v in ann[field]]
    if len(kpts) != 3 * num_keypoints:
      raise AnnotationError(f'{where}: {"+".join(fields)} has {len(kpts)} values, expected '
                            f'{3 * num_keypoints} ({num_keypoints} keypoints × 3)')
    if len(ann['bbox']) != 4:
      raise AnnotationError(f'{where}: bbox must be [x, y, w, h], got {ann["bbox"]!r}')
    rec = {k: ann[k] for k in ('image_id', 'category_id', 'bbox', 'area') if k in ann}
    rec.update(id=i + 1 if renumber else ann['id'], keypoints=kpts,
               num_keypoints=int(np.count_nonzero(np.asarray(kpts[2::3], np.float64) > 0)),
               iscrowd=ann.get('iscrowd', False))
    anns.append(rec)
  return _coco({'images': dataset['images'], 'categories': dataset['categories'],
                'annotations': anns})


def _dt_coco(gt: COCO, results: Sequence[Mapping[str, Any]], source: str,
             fields: Sequence[str], num_keypoints: int) -> COCO:
  """Detections as xtcocotools' `loadRes` + `_prepare` see them (module doc 3 and 5)."""
  image_ids = set(gt.getImgIds())
  anns = []
  for i, r in enumerate(results):
    where = f'{source}: result {i} (image_id {r.get("image_id")!r})'
    for key in ('image_id', 'category_id', 'score', 'keypoints', *fields):
      if key not in r:
        raise ValueError(f'{where} has no {key!r}')
    if r['image_id'] not in image_ids:
      raise ValueError(f'{where}: image_id is not in the ground truth')
    kpts = [v for field in fields for v in r[field]]
    body = np.asarray(r['keypoints'], np.float64)
    if len(kpts) != 3 * num_keypoints or body.size % 3:
      raise ValueError(f'{where}: {"+".join(fields)} has {len(kpts)} values, expected '
                       f'{3 * num_keypoints} ({num_keypoints} keypoints × 3)')
    if not (np.isfinite(np.asarray(kpts, np.float64)).all() and np.isfinite(body).all()
            and np.isfinite(r['score'])):
      raise ValueError(f'{where}: non-finite keypoints or score')
    if not np.any(np.asarray(kpts[2::3], np.float64) > 0):
      continue
    x, y = body[0::3], body[1::3]
    x0, x1, y0, y1 = np.min(x), np.max(x), np.min(y), np.max(y)
    anns.append({'image_id': r['image_id'], 'category_id': r['category_id'], 'keypoints': kpts,
                 'score': r['score'], 'area': (x1 - x0) * (y1 - y0),
                 'bbox': [x0, y0, x1 - x0, y1 - y0], 'id': len(anns) + 1})
  return _coco({'images': gt.dataset['images'], 'categories': gt.dataset['categories'],
                'annotations': anns})


def _results(results: Sequence[Mapping[str, Any]] | str | os.PathLike
             ) -> tuple[Sequence[Mapping[str, Any]], str]:
  if isinstance(results, (str, os.PathLike)):
    path = os.fspath(results)
    data = load_json(path, required=())
    if not isinstance(data, list):
      raise ValueError(f'{path}: a result file is a JSON list of detections')
    return data, path
  return results, 'results'


def _keypoint_eval(dataset: dict[str, Any], source: str,
                   results: Sequence[Mapping[str, Any]], results_source: str,
                   sigmas: np.ndarray, use_area: bool, fields: Sequence[str]) -> dict[str, float]:
  sigmas = np.asarray(sigmas, dtype=np.float64)
  gt = _gt_coco(dataset, source, fields, len(sigmas), use_area)
  dt = _dt_coco(gt, results, results_source, fields, len(sigmas))
  ev = (COCOeval if use_area else _BoxAreaCOCOeval)(gt, dt, 'keypoints')
  ev.params.kpt_oks_sigmas = sigmas
  ev.params.useSegm = None
  _quiet(ev.evaluate)
  _quiet(ev.accumulate)
  _quiet(ev.summarize)
  return {name: float(v) for name, v in zip(STATS_NAMES, ev.stats)}


def coco_keypoint_eval(gt: GroundTruth, results: Sequence[Mapping[str, Any]] | str | os.PathLike,
                       sigmas: np.ndarray, *, use_area: bool = True,
                       fields: Sequence[str] = ('keypoints',)) -> dict[str, float]:
  """xtcocotools `COCOeval(gt, dt, 'keypoints', sigmas, use_area)` → the 10 summary stats.

  Args:
    gt: ground truth: a COCO keypoint JSON path, its dict, or a pycocotools `COCO`.
    results: result records (`results_json`) or the path of a result JSON list.
    sigmas: `[K]` OKS sigmas of the evaluated keypoints.
    use_area: False for AIC (OKS scale and area ranges from `0.53 · w · h` of the GT box).
    fields: annotation/result fields concatenated into the evaluated keypoints (a WholeBody
      part, see `WHOLEBODY_PARTS`).

  Returns:
    `STATS_NAMES` → value (AP over OKS 0.50:0.95, maxDets 20, areas all/medium/large; -1 where
    no ground truth falls in a range, as COCOeval reports).
  """
  dataset, source = _gt_dataset(gt)
  results, results_source = _results(results)
  return _keypoint_eval(dataset, source, results, results_source, sigmas, use_area, fields)


def wholebody_keypoint_eval(gt: GroundTruth,
                            results: Sequence[Mapping[str, Any]] | str | os.PathLike,
                            sigmas: np.ndarray) -> dict[str, float]:
  """COCO-WholeBody: the five part evaluations, then whole-body (spec §5.5).

  Args:
    gt: ground truth with `keypoints`, `foot_kpts`, `face_kpts`, `lefthand_kpts`,
      `righthand_kpts` per annotation (path, dict or `COCO`).
    results: WholeBody result records (`results_json(..., 'coco_wholebody')`) or their path.
    sigmas: `[133]` sigmas; sliced at 0, 17, 23, 91, 112, 133 for the parts.

  Returns:
    The whole-body stats under the plain `STATS_NAMES` (what the reference reports), and every
    part's stats as `"<part>/<stat>"` (part ∈ body, foot, face, lefthand, righthand, wholebody).
  """
  sigmas = np.asarray(sigmas, dtype=np.float64)
  if len(sigmas) != sum(WHOLEBODY_PART_SIZES):
    raise ValueError(f'WholeBody needs {sum(WHOLEBODY_PART_SIZES)} sigmas, got {len(sigmas)}')
  dataset, source = _gt_dataset(gt)
  results, results_source = _results(results)
  cuts = np.cumsum((0,) + WHOLEBODY_PART_SIZES)
  out = {}
  for j, (part, fields) in enumerate(WHOLEBODY_PARTS):
    part_sigmas = sigmas if part == 'wholebody' else sigmas[cuts[j]:cuts[j + 1]]
    stats = _keypoint_eval(dataset, source, results, results_source, part_sigmas, True, fields)
    out.update({f'{part}/{name}': v for name, v in stats.items()})
  out.update({name: out[f'wholebody/{name}'] for name in STATS_NAMES})
  return out


# ----------------------------------------------------------------------------------------------
# One entry point per benchmark (spec §5.1)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How one benchmark kind is scored.

  Attributes:
    skeleton: `data_pipelines.skeletons` name that gives the keypoint count and OKS sigmas.
    use_area: xtcocotools' `use_area` (False only for AIC).
    gt_category: results carry the prediction's `category_id` (AP-10K/APT-36K, evaluated per
      category with `useCats=1`); otherwise category 1 (people).
    wholebody: COCO-WholeBody's part-wise evaluation.
  """

  skeleton: str
  use_area: bool = True
  gt_category: bool = False
  wholebody: bool = False


PROTOCOLS: dict[str, Protocol] = {
    'coco': Protocol('coco'),
    'ochuman': Protocol('coco'),  # OCHuman uses COCO's keypoints and sigmas (spec §5.1).
    'aic': Protocol('aic', use_area=False),
    'ap10k': Protocol('ap10k', gt_category=True),
    'apt36k': Protocol('apt36k', gt_category=True),
    'coco_wholebody': Protocol('coco_wholebody', wholebody=True),
}


def _protocol(kind: str) -> Protocol:
  try:
    return PROTOCOLS[kind]
  except KeyError:
    hint = ' (MPII is scored by PCKh: posebh_jax.evaluation.mpii_metrics)' if kind == 'mpii' else ''
    raise ValueError(f'unknown dataset kind {kind!r}{hint}; known: {sorted(PROTOCOLS)}') from None


def evaluate_dataset(kind: str, gt: GroundTruth, predictions: Sequence[KeypointPrediction],
                     sigmas: np.ndarray | None = None, *, vis_thr: float = 0.2,
                     oks_thr: float = 0.9, soft_nms: bool = False, use_nms: bool = True,
                     results_path: str | os.PathLike | None = None) -> dict[str, float]:
  """Scores one benchmark's predictions like the reference's `dataset.evaluate` (spec §5).

  Args:
    kind: 'coco', 'ochuman', 'aic', 'ap10k', 'apt36k' or 'coco_wholebody'.
    gt: the benchmark's ground-truth annotation file (path, dict or `COCO`).
    predictions: one `KeypointPrediction` per evaluated box (duplicates allowed).
    sigmas: OKS sigmas; default the kind's skeleton sigmas.
    vis_thr, oks_thr, soft_nms, use_nms: the data config of spec §5.1 (defaults as PoseBH).
    results_path: if given, the result JSON is also written there (as mmpose's
      `result_keypoints.json`).

  Returns:
    `STATS_NAMES` → value; for WholeBody also the per-part `"<part>/<stat>"` entries.
  """
  protocol = _protocol(kind)
  if sigmas is None:
    sigmas = get_skeleton(protocol.skeleton).sigmas
  kept = rescore_and_nms(predictions, np.asarray(sigmas, np.float64), vis_thr=vis_thr,
                         oks_thr=oks_thr, soft_nms=soft_nms, use_nms=use_nms)
  results = results_json(kept, kind, len(sigmas))
  if results_path is not None:
    storage.write_text(results_path, json.dumps(results, sort_keys=True, indent=4))
  if protocol.wholebody:
    return wholebody_keypoint_eval(gt, results, sigmas)
  return coco_keypoint_eval(gt, results, sigmas, use_area=protocol.use_area)
