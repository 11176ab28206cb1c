"""COCO-style keypoint metrics (spec §5.4, §5.5) on the real sample annotations.

Ground truth as predictions must score AP 1 for every benchmark kind; perturbed predictions must
score exactly what an independent pycocotools run gives on the same written result file (with
the test's own rendering of each xtcocotools rule); the dedupe/rescore/NMS path must keep what
the reference's OKS-NMS keeps on the golden poses.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from conftest import load_golden, shared_path
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data_pipelines import transforms
from data_pipelines.skeletons import get_skeleton
from posebh_jax.evaluation import coco_metrics as cm

# kind → (sample annotation file, skeleton). APT-36K uses AP-10K's format and keypoints, and
# OCHuman COCO's, so their samples stand in.
SAMPLES = {
    'coco': 'coco/test_coco.json',
    'ochuman': 'coco/test_coco.json',
    'aic': 'aic/test_aic.json',
    'ap10k': 'ap10k/test_ap10k.json',
    'apt36k': 'ap10k/test_ap10k.json',
    'coco_wholebody': 'coco/test_coco_wholebody.json',
}
PARTS = ('keypoints', 'foot_kpts', 'face_kpts', 'lefthand_kpts', 'righthand_kpts')
PART_NAMES = ('body', 'foot', 'face', 'lefthand', 'righthand')
PART_CUTS = np.cumsum([0, 17, 6, 68, 21, 21])


def _sample(kind: str) -> str:
  return str(shared_path(f'data/samples/{SAMPLES[kind]}'))


def _fields(kind: str) -> tuple[str, ...]:
  return PARTS if kind == 'coco_wholebody' else ('keypoints',)


def _quiet(fn, *args):
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*args)


def _gt_keypoints(ann: dict, kind: str) -> np.ndarray:
  return np.concatenate([np.asarray(ann[f], np.float64).reshape(-1, 3) for f in _fields(kind)])


def _box_record(bbox, **kw) -> dict:
  center, scale = transforms.box_to_center_scale(bbox, 192 / 256)
  return dict(center=center, scale=scale, area=float(np.prod(scale * 200)), **kw)


def _gt_predictions(kind: str) -> list[cm.KeypointPrediction]:
  """Every annotation as a prediction: GT positions, score 1 on labelled keypoints, else 0."""
  data = json.load(open(_sample(kind)))
  preds, per_image = [], {}
  for ann in data['annotations']:
    kpts = _gt_keypoints(ann, kind)
    kpts[:, 2] = (kpts[:, 2] > 0).astype(np.float64)
    bbox_id = per_image.setdefault(ann['image_id'], 0)
    per_image[ann['image_id']] += 1
    preds.append(cm.KeypointPrediction(
        image_id=ann['image_id'], category_id=ann['category_id'], keypoints=kpts,
        bbox_score=1.0, bbox_id=bbox_id, **_box_record(ann['bbox'])))
  return preds


def _perturbed_predictions(kind: str, seed: int) -> list[cm.KeypointPrediction]:
  """Seeded noise and scores, dropped and extra instances, all-zero-score ones, duplicates."""
  rng = np.random.default_rng(seed)
  data = json.load(open(_sample(kind)))
  sigmas = np.asarray(get_skeleton(cm.PROTOCOLS[kind].skeleton).sigmas)
  preds, bbox_id = [], 0
  for i, ann in enumerate(data['annotations']):
    if i > 0 and rng.random() < 0.2:
      continue  # Missed instance (never the first: the AP-10K sample has only two).
    kpts = _gt_keypoints(ann, kind)
    # Noise on the OKS scale (2·sigma·sqrt(box area)), so each instance gets an OKS anywhere
    # between ~1 and ~0 for every dataset's sigmas.
    std = rng.uniform(0, 0.8) * 2 * sigmas * np.sqrt(ann['bbox'][2] * ann['bbox'][3])
    kpts[:, :2] += rng.normal(0, 1, size=(len(kpts), 2)) * std[:, None]
    kpts[:, 2] = rng.uniform(0.01, 1.0, len(kpts))
    if rng.random() < 0.3:  # A good pose whose (part) scores are all 0: xtcocotools drops it.
      part = rng.integers(1, 5) if kind == 'coco_wholebody' else 0
      kpts[PART_CUTS[part]:PART_CUTS[part + 1] if kind == 'coco_wholebody' else None, 2] = 0
    preds.append(cm.KeypointPrediction(
        image_id=ann['image_id'], category_id=ann['category_id'], keypoints=kpts,
        bbox_score=rng.uniform(0.3, 1.0), bbox_id=bbox_id, **_box_record(ann['bbox'])))
    bbox_id += 1
  images = data['images']
  k = len(preds[0].keypoints)
  for _ in range(5):  # False positives of random size anywhere.
    img = images[rng.integers(len(images))]
    cx, cy, size = rng.uniform(0, img['width']), rng.uniform(0, img['height']), rng.uniform(20, 400)
    kpts = np.stack([cx + rng.normal(0, size / 3, k), cy + rng.normal(0, size / 3, k),
                     rng.uniform(0, 1, k)], axis=1)
    cat = data['annotations'][rng.integers(len(data['annotations']))]['category_id']
    preds.append(cm.KeypointPrediction(
        image_id=img['id'], category_id=cat, keypoints=kpts, bbox_score=rng.uniform(0, 1),
        bbox_id=bbox_id, **_box_record([cx - size / 2, cy - size / 2, size * 0.75, size])))
    bbox_id += 1
  return preds + preds[:3]  # Distributed-sampler padding repeats the first boxes.


def _direct_eval(gt: COCO, dets: list[dict], sigmas) -> dict[str, float]:
  """Plain pycocotools, as a reader would run it on a result file."""
  dt = _quiet(gt.loadRes, dets)
  ev = COCOeval(gt, dt, 'keypoints')
  ev.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
  for step in (ev.evaluate, ev.accumulate, ev.summarize):
    _quiet(step)
  return dict(zip(cm.STATS_NAMES, (float(s) for s in ev.stats)))


def _scored(dets: list[dict], fields) -> list[dict]:
  """xtcocotools drops detections without any score > 0 among the evaluated keypoints."""
  return [d for d in dets if any(s > 0 for f in fields for s in d[f][2::3])]


# ---------------------------------------------------------------------------------------------
# Ground truth as predictions.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('kind', sorted(SAMPLES))
def test_ground_truth_as_predictions_scores_ap_1(kind):
  stats = cm.evaluate_dataset(kind, _sample(kind), _gt_predictions(kind))
  # COCOeval's precision tp / (tp + fp + eps) is 1 - 2e-16 with a single true positive.
  assert stats['AP'] == pytest.approx(1.0, abs=1e-12) and stats['AR'] == 1.0
  # Every other stat is perfect too, or -1 where no ground truth falls in the area range.
  assert all(stats[name] == pytest.approx(1.0, abs=1e-12) or stats[name] == -1.0
             for name in cm.STATS_NAMES), stats


def test_wholebody_every_labelled_part_scores_ap_1():
  data = json.load(open(_sample('coco_wholebody')))
  stats = cm.evaluate_dataset('coco_wholebody', data, _gt_predictions('coco_wholebody'))
  labelled = [part for part, field in zip(PART_NAMES, PARTS)
              if any(v > 0 for a in data['annotations'] for v in a[field][2::3])]
  assert labelled == ['body', 'foot', 'face', 'lefthand', 'righthand']
  for part in labelled + ['wholebody']:
    assert stats[f'{part}/AP'] == pytest.approx(1.0, abs=1e-12), part
  assert stats['AP'] == stats['wholebody/AP']


# ---------------------------------------------------------------------------------------------
# Perturbed predictions vs an independent pycocotools run on the written result file.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('kind', ['coco', 'ap10k'])
def test_perturbed_equals_direct_pycocotools(kind, seed, tmp_path):
  res_file = tmp_path / 'result_keypoints.json'
  ours = cm.evaluate_dataset(kind, _sample(kind), _perturbed_predictions(kind, seed),
                             results_path=res_file)
  gt = _quiet(COCO, _sample(kind))
  # pycocotools reads `num_keypoints` where xtcocotools counts v > 0; the samples agree.
  assert all(a['num_keypoints'] == sum(v > 0 for v in a['keypoints'][2::3])
             for a in gt.dataset['annotations'])
  dets = json.loads(res_file.read_text())
  direct = _direct_eval(gt, _scored(dets, ['keypoints']), get_skeleton(kind).sigmas)
  assert ours == direct
  assert 0 < ours['AP'] < 1  # The perturbation is neither trivial nor hopeless.


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_aic_use_area_false_equals_gt_with_box_areas(seed, tmp_path):
  res_file = tmp_path / 'result_keypoints.json'
  ours = cm.evaluate_dataset('aic', _sample('aic'), _perturbed_predictions('aic', seed),
                             results_path=res_file)
  # xtcocotools' use_area=False reads `bbox[3] * bbox[2] * 0.53` for the OKS and
  # `bbox[2] * bbox[3] * 0.53` for the area ranges: exactly the two places pycocotools reads
  # gt['area'], and float products commute, so a ground truth whose `area` holds that product
  # is evaluated identically. xtcocotools' loader also defaults a missing `iscrowd` to False.
  data = json.load(open(_sample('aic')))
  assert all('area' not in a and 'iscrowd' not in a for a in data['annotations'])
  for ann in data['annotations']:
    ann['area'] = ann['bbox'][3] * ann['bbox'][2] * 0.53
    ann['iscrowd'] = 0
  gt_file = tmp_path / 'aic_box_area.json'
  gt_file.write_text(json.dumps(data))
  gt = _quiet(COCO, str(gt_file))
  direct = _direct_eval(gt, _scored(json.loads(res_file.read_text()), ['keypoints']),
                        get_skeleton('aic').sigmas)
  assert ours == direct
  assert 0 < ours['AP'] < 1
  # The same results with the real-area rule (areas as above ÷ 0.53) score differently.
  for ann in data['annotations']:
    ann['area'] = ann['bbox'][2] * ann['bbox'][3]
  assert cm.coco_keypoint_eval(data, res_file, get_skeleton('aic').sigmas) != ours


@pytest.mark.parametrize('seed', [0, 1])
def test_wholebody_parts_equal_direct_pycocotools(seed, tmp_path):
  res_file = tmp_path / 'result_keypoints.json'
  ours = cm.evaluate_dataset('coco_wholebody', _sample('coco_wholebody'),
                             _perturbed_predictions('coco_wholebody', seed), results_path=res_file)
  data = json.load(open(_sample('coco_wholebody')))
  dets = json.loads(res_file.read_text())
  sigmas = np.asarray(get_skeleton('coco_wholebody').sigmas)
  runs = [(p, (f,), sigmas[PART_CUTS[j]:PART_CUTS[j + 1]])
          for j, (p, f) in enumerate(zip(PART_NAMES, PARTS))] + [('wholebody', PARTS, sigmas)]
  for part, fields, part_sigmas in runs:
    # xtcocotools' keypoints_<part>: the part's values; GT ignored without a v > 0 there.
    gt_part = {**data, 'annotations': [
        {**a, 'keypoints': sum((a[f] for f in fields), []),
         'num_keypoints': sum(v > 0 for f in fields for v in a[f][2::3])}
        for a in data['annotations']]}
    gt = COCO()
    gt.dataset = gt_part
    _quiet(gt.createIndex)
    kept = _scored(dets, fields)
    dt_part = [{'image_id': d['image_id'], 'category_id': d['category_id'],
                'score': d['score'], 'keypoints': sum((d[f] for f in fields), [])} for d in kept]
    direct_dt = _quiet(gt.loadRes, dt_part)
    for ann, d in zip(direct_dt.dataset['annotations'], kept):
      # xtcocotools' loadRes sizes every detection from its body `keypoints` field.
      x, y = d['keypoints'][0::3], d['keypoints'][1::3]
      ann['area'] = (max(x) - min(x)) * (max(y) - min(y))
    ev = COCOeval(gt, direct_dt, 'keypoints')
    ev.params.kpt_oks_sigmas = part_sigmas
    for step in (ev.evaluate, ev.accumulate, ev.summarize):
      _quiet(step)
    direct = dict(zip(cm.STATS_NAMES, (float(s) for s in ev.stats)))
    assert {n: ours[f'{part}/{n}'] for n in cm.STATS_NAMES} == direct, part
  assert 0 < ours['AP'] < 1


def test_scoreless_detection_is_dropped_as_xtcocotools_does():
  preds = _gt_predictions('coco')
  target = next(i for i, p in enumerate(preds) if p.keypoints[:, 2].sum() > 0)
  zeroed = preds[target].keypoints.copy()
  zeroed[:, 2] = 0
  preds[target] = cm.KeypointPrediction(**{**preds[target].__dict__, 'keypoints': zeroed})
  kept = cm.rescore_and_nms(preds, get_skeleton('coco').sigmas)
  dets = cm.results_json(kept, 'coco')
  ours = cm.coco_keypoint_eval(_sample('coco'), dets, get_skeleton('coco').sigmas)
  gt = _quiet(COCO, _sample('coco'))
  assert ours == _direct_eval(gt, _scored(dets, ['keypoints']), get_skeleton('coco').sigmas)
  assert ours['AR'] < 1  # Its person is missed ...
  # ... while plain pycocotools would match the score-0 pose last and find everyone.
  assert _direct_eval(gt, dets, get_skeleton('coco').sigmas)['AR'] == 1.0


def test_annotation_id_zero_still_matches(tmp_path):
  data = json.load(open(_sample('coco')))
  ann = next(a for a in data['annotations'] if a['num_keypoints'] > 0)
  ann['id'] = 0
  preds = _gt_predictions('coco')
  assert cm.evaluate_dataset('coco', data, preds)['AP'] == pytest.approx(1.0, abs=1e-12)
  # pycocotools alone takes a match to id 0 for "unmatched" (xtcocotools uses -1).
  gt_file = tmp_path / 'gt.json'
  gt_file.write_text(json.dumps(data))
  dets = cm.results_json(cm.rescore_and_nms(preds, get_skeleton('coco').sigmas), 'coco')
  direct = _direct_eval(_quiet(COCO, str(gt_file)), _scored(dets, ['keypoints']),
                        get_skeleton('coco').sigmas)
  assert direct['AP'] < 0.99


# ---------------------------------------------------------------------------------------------
# Dedupe, rescoring and OKS-NMS (spec §5.4 steps 1-3).
# ---------------------------------------------------------------------------------------------


def _golden_predictions(golden, image_ids=None) -> list[cm.KeypointPrediction]:
  """The golden poses as predictions whose rescored scores rank like the golden scores."""
  kpts = golden['keypoints']
  valid = kpts[..., 2] > 0.2
  kpt_score = np.array([kpts[i, valid[i], 2].mean() for i in range(len(kpts))])
  box = golden['scores'] / kpt_score
  image_ids = np.zeros(len(kpts), int) if image_ids is None else image_ids
  return [cm.KeypointPrediction(image_id=int(image_ids[i]), category_id=1, keypoints=kpts[i],
                                center=[0, 0], scale=[1, 1], area=golden['areas'][i],
                                bbox_score=box[i], bbox_id=i) for i in range(len(kpts))]


@pytest.mark.parametrize('soft,key', [(False, 'keep_oks_nms_thr0p9'),
                                      (True, 'keep_soft_oks_nms_thr0p9')])
def test_rescore_and_nms_keeps_the_reference_set(soft, key):
  golden = load_golden('oks_nms.npz')
  preds = _golden_predictions(golden)
  rng = np.random.default_rng(0)
  shuffled = [preds[i] for i in rng.permutation(len(preds))]
  duplicates = [preds[i] for i in (3, 3, 17, 29)]  # Padding repeats some boxes.
  # Rescoring (mean score of keypoints > 0.2, times the box score) gives back the golden
  # scores, so their ranking, which the golden keep order depends on, is unchanged.
  rescored = np.array([p.score for p in cm.rescore_and_nms(preds, golden['sigmas'],
                                                           use_nms=False)])
  np.testing.assert_allclose(rescored, golden['scores'], rtol=1e-6)
  assert (np.argsort(-rescored) == np.argsort(-golden['scores'])).all()
  kept = cm.rescore_and_nms(shuffled + duplicates, golden['sigmas'], soft_nms=soft)
  assert [p.bbox_id for p in kept] == golden[key].tolist()


def test_nms_runs_per_image_and_dedupes_by_bbox_id():
  golden = load_golden('oks_nms.npz')
  halves = np.arange(30) % 2  # Interleave two images.
  preds = _golden_predictions(golden, image_ids=halves)
  kept = cm.rescore_and_nms(preds[::-1] + preds[:5], golden['sigmas'])
  for image in (0, 1):
    alone = cm.rescore_and_nms([p for p in preds if p.image_id == image], golden['sigmas'])
    assert [p.bbox_id for p in kept if p.image_id == image] == [p.bbox_id for p in alone]
  assert len({(p.image_id, p.bbox_id) for p in kept}) == len(kept)
  # Without NMS every box survives exactly once.
  assert len(cm.rescore_and_nms(preds + preds, golden['sigmas'], use_nms=False)) == 30


def test_instance_without_confident_keypoints_scores_zero():
  pred = _gt_predictions('coco')[0]
  low = pred.keypoints.copy()
  low[:, 2] = 0.2  # Not > vis_thr.
  (kept,) = cm.rescore_and_nms([cm.KeypointPrediction(**{**pred.__dict__, 'keypoints': low})],
                               get_skeleton('coco').sigmas)
  assert kept.score == 0.0


# ---------------------------------------------------------------------------------------------
# Result records (spec §5.4 step 4).
# ---------------------------------------------------------------------------------------------


def test_results_json_splits_wholebody_and_sets_categories():
  wb = cm.results_json(cm.rescore_and_nms(_gt_predictions('coco_wholebody'),
                                          get_skeleton('coco_wholebody').sigmas), 'coco_wholebody')
  assert [len(wb[0][f]) for f in PARTS] == [51, 18, 204, 63, 63]
  assert 'keypoints' in wb[0] and all(r['category_id'] == 1 for r in wb)
  animals = _gt_predictions('ap10k')
  recs = cm.results_json(cm.rescore_and_nms(animals, get_skeleton('ap10k').sigmas), 'ap10k')
  assert sorted(r['category_id'] for r in recs) == sorted(p.category_id for p in animals) == [1, 26]
  people = [cm.KeypointPrediction(**{**p.__dict__, 'category_id': 7})
            for p in _gt_predictions('coco')]
  recs = cm.results_json(cm.rescore_and_nms(people, get_skeleton('coco').sigmas), 'coco')
  assert {r['category_id'] for r in recs} == {1}  # People are always category 1.
  json.dumps(recs)  # Serialisable as is.


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


def test_unknown_kind_is_a_clear_error():
  with pytest.raises(ValueError, match=r"unknown dataset kind 'lsp'.*'aic'"):
    cm.evaluate_dataset('lsp', _sample('coco'), _gt_predictions('coco'))
  with pytest.raises(ValueError, match='PCKh'):
    cm.evaluate_dataset('mpii', _sample('coco'), _gt_predictions('coco'))


def test_wrong_keypoint_count_is_a_clear_error():
  with pytest.raises(ValueError, match=r'image_id 785, bbox_id 0\) has 17 keypoints, expected 14'):
    cm.evaluate_dataset('aic', _sample('aic'), _gt_predictions('coco'))
  with pytest.raises(ValueError, match='expected 133'):
    cm.results_json(cm.rescore_and_nms(_gt_predictions('coco'), get_skeleton('coco').sigmas),
                    'coco_wholebody')
  with pytest.raises(ValueError, match=r'keypoints must be \[K, 3\]'):
    cm.KeypointPrediction(1, 1, np.zeros((17, 2)), [0, 0], [1, 1], 1.0, 1.0, 0)


def test_non_finite_values_are_a_clear_error():
  kpts = np.ones((17, 3))
  kpts[4, 0] = np.nan
  with pytest.raises(ValueError, match=r'image_id 9, bbox_id 2\): non-finite keypoint values '
                                       r'at keypoints \[4\]'):
    cm.KeypointPrediction(9, 1, kpts, [0, 0], [1, 1], 1.0, 1.0, 2)
  with pytest.raises(ValueError, match='bbox_score is not finite'):
    cm.KeypointPrediction(9, 1, np.ones((17, 3)), [0, 0], [1, 1], 1.0, np.inf, 2)
  dets = cm.results_json(cm.rescore_and_nms(_gt_predictions('coco'), get_skeleton('coco').sigmas),
                         'coco')
  dets[1]['keypoints'][7] = float('inf')
  with pytest.raises(ValueError, match=r'result 1 \(image_id \d+\): non-finite'):
    cm.coco_keypoint_eval(_sample('coco'), dets, get_skeleton('coco').sigmas)


def test_bad_ground_truth_and_results_are_clear_errors(tmp_path):
  sigmas = get_skeleton('aic').sigmas
  dets = cm.results_json(cm.rescore_and_nms(_gt_predictions('aic'), sigmas), 'aic')
  with pytest.raises(cm.AnnotationError, match=r"test_aic.json: annotation 4 \(#0\) has no 'area'"):
    cm.coco_keypoint_eval(_sample('aic'), dets, sigmas, use_area=True)
  dets[0]['image_id'] = 123456
  with pytest.raises(ValueError, match='result 0 .*not in the ground truth'):
    cm.coco_keypoint_eval(_sample('aic'), dets, sigmas, use_area=False)
  with pytest.raises(cm.AnnotationError, match='not found'):
    cm.coco_keypoint_eval(tmp_path / 'missing.json', dets, sigmas)
  with pytest.raises(ValueError, match='needs 133 sigmas'):
    cm.wholebody_keypoint_eval(_sample('coco_wholebody'), [], sigmas)
