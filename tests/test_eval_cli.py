"""posebh-eval with the paper protocol (spec §5.1) on the converted tiny reference checkpoint and
the sample data, and evaluation at an interval during training.

The tiny reference model is untrained, so its scores are near zero; the tests therefore check
the plumbing where it can go wrong: every value equals what coco_metrics / mpii_metrics give
for the very predictions the run made (captured from the predictor) against the sample files
read independently; ground truth fed through the same path scores 1; boxes come from the
detections or the annotations as asked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, shared_path
from configs import common
from configs import posebh as posebh_configs
from configs import synthetic as synthetic_configs
from posebh_jax import config_checks
from posebh_jax.evaluation import evaluate
from posebh_jax.evaluation import benchmark
from posebh_jax.evaluation import coco_metrics as cm
from posebh_jax.evaluation import mpii_metrics as mm
from posebh_jax.evaluation import predict

SAMPLE_SETS = ("coco", "aic", "mpii", "ap10k", "coco_wholebody")
# Evaluation-only (data.eval_datasets), predicted with COCO's expert and head.
EVAL_ONLY_SETS = ("ochuman",)
ANNOTATIONS = {"coco": "coco/test_coco.json", "aic": "aic/test_aic.json",
               "mpii": "mpii/test_mpii.json", "ap10k": "ap10k/test_ap10k.json",
               "coco_wholebody": "coco/test_coco_wholebody.json"}
DETECTIONS = "coco/test_coco_det_AP_H_56.json"
INDEX = {n: i for i, n in enumerate(("coco", "aic", "mpii", "ap10k", "apt36k",
                                     "coco_wholebody"))}


def _sample(rel: str) -> str:
  return str(shared_path(f"data/samples/{rel}"))


def _config():
  config = posebh_configs.get_config("tiny_reference_samples")
  config.data.root = str(shared_path("data/samples"))
  return config


class _Spy:
  """Records what `TopDownPredictor.predict_records` was given and returned, per skeleton."""

  def __init__(self, monkeypatch, replace=None):
    self.calls: dict[int, tuple[list, list]] = {}
    self.all_calls: list[tuple[int, list, list]] = []
    original = predict.TopDownPredictor.predict_records
    spy = self

    def wrapped(self_, params, batch_stats, prototypes, records, a, **kw):
      if replace is None:
        out = original(self_, params, batch_stats, prototypes, records, a, **kw)
      else:
        out = replace(records)
      # The first call per skeleton: the dataset's own (OCHuman comes later through COCO's).
      spy.calls.setdefault(a, (list(records), out))
      spy.all_calls.append((a, list(records), out))
      return out
    monkeypatch.setattr(predict.TopDownPredictor, "predict_records", wrapped)


@pytest.fixture(scope="module")
def full_run(tiny_weights, tmp_path_factory):
  """One evaluation of every sample set with the config's boxes, predictions captured."""
  mp = pytest.MonkeyPatch()
  spy = _Spy(mp)
  workdir = str(tmp_path_factory.mktemp("eval_all"))
  import contextlib
  import io
  buf = io.StringIO()
  try:
    with contextlib.redirect_stdout(buf):
      out = evaluate.evaluate_weights(_config(), tiny_weights, workdir)
  finally:
    mp.undo()
  return out, spy, workdir, buf.getvalue()


def _as_predictions(preds):
  return [cm.KeypointPrediction(
      image_id=p["image_id"], category_id=p["category_id"], keypoints=p["keypoints"],
      center=p["center"], scale=p["scale"], area=p["area"], bbox_score=p["bbox_score"],
      bbox_id=p["bbox_id"]) for p in preds]


def test_table_and_json_for_all_five_sample_sets(full_run):
  out, _, workdir, stdout = full_run
  assert "Evaluation at step 0" in stdout and "with flip test" in stdout
  for name in SAMPLE_SETS + EVAL_ONLY_SETS:
    assert any(line.startswith(name + " ") for line in stdout.splitlines()), name
  assert "WholeBody AP" in stdout and "apt36k" not in stdout  # No APT-36K sample.
  # posebh-eval's outputs go to their own folder, never the training run's eval/.
  with open(os.path.join(workdir, "eval_cli", "all", "metrics_0.json")) as f:
    metrics = json.load(f)
  assert set(metrics["per_dataset"]) == set(SAMPLE_SETS + EVAL_ONLY_SETS)
  assert out["metrics_file"] == os.path.join(workdir, "eval_cli", "all", "metrics_0.json")
  assert not os.path.exists(os.path.join(workdir, "eval"))
  for name, m in metrics["per_dataset"].items():
    values = {k: v for k, v in m.items() if k not in ("metric", "boxes", "num_instances")
              and not k.endswith("skipped_instances")}
    assert values, name
    for k, v in values.items():
      # -1: COCOeval's "no ground truth in this area range"; None: a joint nobody annotates.
      assert v is None or v == -1 or 0.0 <= v <= 1.0, (name, k, v)
  assert metrics["per_dataset"]["coco"]["metric"] == "coco_oks"
  assert metrics["per_dataset"]["mpii"]["metric"] == "pckh"
  for part in ("body", "foot", "face", "lefthand", "righthand", "wholebody"):
    assert f"{part}/AP" in metrics["per_dataset"]["coco_wholebody"]
  # The result files mmpose would write, per COCO-style dataset.
  assert sorted(os.listdir(os.path.join(workdir, "eval_cli", "all", "results_0"))) == sorted(
      f"{n}_keypoints.json" for n in SAMPLE_SETS + EVAL_ONLY_SETS if n != "mpii")


def test_ochuman_through_coco_expert_and_head_with_coco_sigmas(full_run):
  """OCHuman (evaluation only) on its sample: ground-truth boxes of its own file, predicted with
  skeleton index 0 (COCO's expert and head), scored by COCOeval with COCO's sigmas."""
  out, spy, _, _ = full_run
  (a, records, preds), = [c for c in spy.all_calls
                          if c[1] and "ochuman" in c[1][0]["image_path"]]
  assert a == 0 and len(records) == len(preds) == 5  # The sample's 5 people, all kept.
  assert all(p["keypoints"].shape == (17, 3) for p in preds)
  want = cm.evaluate_dataset("ochuman", _sample("ochuman/test_ochuman.json"),
                             _as_predictions(preds))
  got = out["datasets"]["ochuman"]
  assert got["values"] == want and got["boxes"] == "gt" and got["metric"] == "coco_oks"


def test_ochuman_entry_checks():
  config = _config()
  config.data.datasets.ochuman.predict_with = "cocoo"
  with pytest.raises(config_checks.ConfigError, match=r"ochuman\.predict_with='cocoo'"):
    config_checks.check_config(config)
  config = _config()
  config.data.datasets.ochuman.skeleton = "aic"
  with pytest.raises(config_checks.ConfigError, match="'aic' has 14 keypoints but 'coco'"):
    config_checks.check_config(config)


@pytest.mark.parametrize("name", ["coco", "aic", "ap10k", "coco_wholebody"])
def test_coco_style_values_equal_coco_metrics_on_the_same_predictions(full_run, name):
  out, spy, _, _ = full_run
  records, preds = spy.calls[INDEX[name]]
  want = cm.evaluate_dataset(name, _sample(ANNOTATIONS[name]), _as_predictions(preds))
  got = out["datasets"][name]["values"]
  assert got == want
  assert out["datasets"][name]["n"] == len(records) == len(preds)


def test_mpii_values_equal_mpii_metrics_on_the_same_predictions(full_run):
  out, spy, _, _ = full_run
  records, preds = spy.calls[INDEX["mpii"]]
  assert [r["ann_id"] for r in records] == list(range(5))  # Every sample entry kept.
  gt = mm.mpii_gt_from_json(_sample(ANNOTATIONS["mpii"]), approximate_headboxes=True)
  want = mm.mpii_pckh(np.stack([p["keypoints"] for p in preds]), gt,
                      [p["bbox_id"] for p in preds])
  got = out["datasets"]["mpii"]["values"]
  assert set(got) == set(want)
  for k, v in want.items():
    expected = v if k.endswith("skipped_instances") else v / 100.0
    assert (math.isnan(got[k]) and math.isnan(expected)) or got[k] == pytest.approx(
        expected, rel=1e-12, abs=0), k


def test_config_boxes_detections_for_coco_and_wholebody_gt_elsewhere(full_run):
  out, spy, _, _ = full_run
  dets = [d for d in json.load(open(_sample(DETECTIONS))) if d["category_id"] == 1]
  gt_images = {im["id"] for im in json.load(open(_sample(ANNOTATIONS["coco"])))["images"]}
  n_det = sum(d["image_id"] in gt_images for d in dets)
  for name in ("coco", "coco_wholebody"):
    records, _ = spy.calls[INDEX[name]]
    assert out["datasets"][name]["boxes"] == "det"
    assert len(records) == n_det and all(r["ann_id"] == -1 for r in records)
  for name in ("aic", "mpii", "ap10k"):
    records, _ = spy.calls[INDEX[name]]
    assert out["datasets"][name]["boxes"] == "gt" and all(r["ann_id"] >= 0 for r in records)


def _gt_as_predictions(records):
  """Ground-truth keypoints as the predictor's output: score 1 where labelled."""
  out = []
  for i, r in enumerate(records):
    k = np.array(r["keypoints"], np.float32)
    k[:, 2] = (k[:, 2] > 0).astype(np.float32)
    out.append(predict.prediction_record(r, k, i))
  return out


def test_ground_truth_through_the_eval_path_scores_one(tiny_weights, tmp_path, monkeypatch,
                                                       capsys):
  _Spy(monkeypatch, replace=_gt_as_predictions)
  out = evaluate.evaluate_weights(_config(), tiny_weights, str(tmp_path), boxes="gt")
  for name in ("coco", "aic", "ap10k"):
    # AP-10K averages over its categories: 1 up to float rounding.
    assert out["datasets"][name]["values"]["AP"] == pytest.approx(1.0, abs=1e-12), name
  wb = out["datasets"]["coco_wholebody"]["values"]
  assert all(wb[f"{p}/AP"] == 1.0 for p in ("body", "foot", "face", "lefthand", "righthand",
                                            "wholebody"))
  assert out["datasets"]["mpii"]["values"]["approx_head/PCKh"] == 1.0
  assert "approximated" in capsys.readouterr().out  # The caveat is printed under the table.


def test_subset_with_gt_boxes_for_coco(tiny_weights, tmp_path, monkeypatch, capsys):
  spy = _Spy(monkeypatch)
  out = evaluate.evaluate_weights(_config(), tiny_weights, str(tmp_path), datasets="coco,mpii",
                                   boxes="gt")
  stdout = capsys.readouterr().out
  assert set(out["datasets"]) == {"coco", "mpii"} and set(spy.calls) == {0, 2}
  assert not any(line.startswith(("aic ", "ap10k ", "coco_wholebody ")) for line in
                 stdout.splitlines()) and "WholeBody AP" not in stdout
  records, preds = spy.calls[0]
  gt = json.load(open(_sample(ANNOTATIONS["coco"])))
  labelled = [a for a in gt["annotations"] if not a["iscrowd"] and a["num_keypoints"] > 0]
  assert out["datasets"]["coco"]["boxes"] == "gt"
  assert len(records) == len(labelled) and {r["ann_id"] for r in records} == {
      a["id"] for a in labelled}
  assert out["datasets"]["coco"]["values"] == cm.evaluate_dataset(
      "coco", _sample(ANNOTATIONS["coco"]), _as_predictions(preds))
  metrics = json.load(open(tmp_path / "eval_cli" / "coco+mpii_gt_boxes" / "metrics_0.json"))
  assert set(metrics["per_dataset"]) == {"coco", "mpii"}


def test_bad_selection_is_a_clear_error(tiny_weights, tmp_path):
  with pytest.raises(benchmark.EvalSelectionError, match=r"unknown dataset\(s\) \['cocoo'\]"):
    evaluate.evaluate_weights(_config(), tiny_weights, str(tmp_path), datasets="coco,cocoo")
  with pytest.raises(benchmark.EvalSelectionError, match="'aic' has no detection boxes"):
    evaluate.evaluate_weights(_config(), tiny_weights, str(tmp_path), datasets="aic",
                               boxes="det")
  with pytest.raises(benchmark.EvalSelectionError, match="'apt36k' has no validation"):
    evaluate.evaluate_weights(_config(), tiny_weights, str(tmp_path), datasets="apt36k")
  assert not (tmp_path / "eval").exists() and not (tmp_path / "eval_cli").exists()


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "posebh_jax.main_eval", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)


def test_cli(tiny_weights, tmp_path):
  common = ["--config=configs/posebh.py:tiny_reference_samples", f"--weights={tiny_weights}",
            f"--config.data.root={shared_path('data/samples')}"]
  bad = _cli(*common, f"--workdir={tmp_path}", "--datasets=coco,nope")
  assert bad.returncode == 1 and "posebh-eval: unknown dataset(s) ['nope']" in bad.stderr
  ok = _cli(*common, f"--workdir={tmp_path}", "--datasets=ap10k,aic", "--boxes=gt")
  assert ok.returncode == 0, ok.stderr[-3000:]
  lines = ok.stdout.splitlines()
  assert any(line.startswith("aic ") for line in lines)
  assert any(line.startswith("ap10k ") for line in lines)
  metrics = json.load(open(tmp_path / "eval_cli" / "ap10k+aic_gt_boxes" / "metrics_0.json"))
  assert set(metrics["per_dataset"]) == {"aic", "ap10k"}
  out_dir = tmp_path / "elsewhere"
  ok = _cli(*common, f"--workdir={tmp_path}", "--datasets=aic", "--boxes=gt", f"--out={out_dir}")
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert set(json.load(open(out_dir / "metrics_0.json"))["per_dataset"]) == {"aic"}


def test_periodic_evaluation_during_training(tmp_path, monkeypatch):
  from posebh_jax.train import loop

  config = synthetic_configs.get_config("tiny")
  config.data.root = str(tmp_path / "data")
  config.data.synthetic.num_train = 16
  config.data.synthetic.num_val = 8
  config.train.num_steps = 2
  config.train.checkpoint_every = 2
  config.train.eval_every = 1  # Step 1 periodically, step 2 by eval_at_end (not twice).
  common.set_stage2(config, -1)  # One compiled train step: the stages are tested elsewhere.
  built, runs = [], []
  make = loop.make_evaluator
  monkeypatch.setattr(loop, "make_evaluator", lambda *a, **k: built.append(1) or make(*a, **k))
  run = benchmark.BenchmarkEvaluator.run
  monkeypatch.setattr(benchmark.BenchmarkEvaluator, "run",
                      lambda self, *a, **k: runs.append(1) or run(self, *a, **k))
  workdir = tmp_path / "wd"
  loop.train_and_evaluate(config, str(workdir))
  files = sorted(os.listdir(workdir / "eval"))
  assert [f for f in files if f.startswith("metrics_")] == ["metrics_1.json", "metrics_2.json"]
  assert len(runs) == 2  # No second evaluation of the last step.
  assert len(built) == 1  # One evaluator (its predict functions compile once) for both.
  for step in (1, 2):
    m = json.load(open(workdir / "eval" / f"metrics_{step}.json"))
    assert m["step"] == step and m["per_dataset"]["synth_coco"]["metric"] == "pck_box"
    assert 0.0 <= m["per_dataset"]["synth_coco"]["pck@0.1"] <= 1.0
  assert any(f.startswith("events") for f in os.listdir(workdir / "tensorboard"))


def test_eval_due():
  from posebh_jax.train import loop
  config = synthetic_configs.get_config("tiny")
  config.train.eval_every, config.train.num_steps, config.train.eval_at_end = 2, 4, True
  assert [loop.eval_due(config, d) for d in (1, 2, 3, 4)] == [False, True, False, False]
  config.train.eval_at_end = False
  assert [loop.eval_due(config, d) for d in (1, 2, 3, 4)] == [False, True, False, True]
  config.train.eval_every = -1
  assert not any(loop.eval_due(config, d) for d in (1, 2, 3, 4))


def test_tensorboard_tags_and_strict_json(tmp_path):
  r = benchmark.DatasetResult("mpii", "pckh", "gt", 5, {
      "AP .5": 0.5, "AP (M)": -1.0, "approx_head/PCKh@0.1": 0.2, "PCKh/pelvis": float("nan")})
  results = benchmark.EvalResults([r], [])
  assert benchmark.tensorboard_scalars(results) == {
      "eval/mpii/AP5": 0.5, "eval/mpii/AP_M": -1.0, "eval/mpii/approx_head/PCKh_0.1": 0.2}
  path = benchmark.write_metrics(results, str(tmp_path), 7)
  text = open(path).read()
  assert "NaN" not in text and json.loads(text)["per_dataset"]["mpii"]["PCKh/pelvis"] is None
