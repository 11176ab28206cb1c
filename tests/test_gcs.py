"""A job whose only storage is a bucket: the real CLIs against a real GCS emulator (issue 14).

fake-gcs-server runs on 127.0.0.1 (`conftest.gcs_emulator`); each CLI is a subprocess with the
emulator's environment (tensorstore and the GCS clients read it once per process). Every test
checks that no local `gs:` folder appeared (what `os.path.abspath("gs://...")` used to create).

  * posebh-train with `--workdir=gs://...` (synthetic data generated into the bucket), SIGKILLed
    after its first checkpoint, rerun: resumes from the bucket and finishes; the bucket holds
    the numbered checkpoints, every step's line in train_metrics.jsonl once, TensorBoard events
    and eval/metrics_<step>.json; posebh-eval and posebh-infer then run from / into the bucket;
  * a TFDS build targeted at gs:// (built locally, copied up), then trained on from the bucket;
  * `metrics_log.append_lines` keeps every line on gs:// (append mode would overwrite).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 6
TINY = "configs/synthetic.py:tiny"
pytestmark = pytest.mark.slow


def _env(gcs) -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=REPO, **gcs.env)
  env.pop("XLA_FLAGS", None)  # One device: the CLIs as a user runs them on a laptop.
  return env


def _run(args, gcs, cwd, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=_env(gcs),
                        capture_output=True, text=True, timeout=timeout)


def _no_local_gs_folder(*dirs) -> None:
  for d in (REPO, *dirs):
    assert not os.path.exists(os.path.join(d, "gs:")), f"a local gs: folder appeared in {d}"


def _train_args(workdir: str, **overrides) -> list[str]:
  args = ["posebh_jax.main_train", f"--config={REPO}/{TINY}", f"--workdir={workdir}",
          f"--config.train.num_steps={NUM_STEPS}"]
  return args + [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def trained_run(gcs_emulator, tmp_path_factory):
  """Trains in gs://<bucket>/run, killed (SIGKILL) after its first checkpoint, then resumed.

  Returns (bucket, workdir URL, cwd, the rerun's CompletedProcess).
  """
  gcs = gcs_emulator
  bucket = gcs.create_bucket()
  workdir = f"gs://{bucket}/run"
  cwd = str(tmp_path_factory.mktemp("cwd"))
  # The first checkpoint is step 2; the stage change at step 2 recompiles the step right after
  # it, so the kill lands after that checkpoint and before step 3 is logged.
  proc = subprocess.Popen([sys.executable, "-m", *_train_args(workdir)], cwd=cwd,
                          env=_env(gcs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  marker = "run/checkpoints/2/commit_success.txt"
  deadline = time.time() + 600
  try:
    while marker not in gcs.list_objects(bucket, "run/checkpoints/"):
      assert proc.poll() is None, f"training ended before its first checkpoint:\n" \
                                  f"{proc.stdout.read()[-3000:]}"
      assert time.time() < deadline, "no checkpoint after 600 s"
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    first_log = proc.communicate(timeout=60)[0]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL, first_log[-3000:]
  assert "training done" not in first_log
  rerun = _run(_train_args(workdir), gcs, cwd)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  return bucket, workdir, cwd, rerun


def test_training_resumes_from_the_bucket_and_keeps_everything_there(gcs_emulator, trained_run):
  bucket, workdir, cwd, rerun = trained_run
  log = rerun.stdout + rerun.stderr
  assert f"resumed from checkpoint at step 2 ({workdir}/checkpoints)" in log
  objects = gcs_emulator.list_objects(bucket, "run/")
  steps = sorted({int(o.split("/")[2]) for o in objects
                  if o.startswith("run/checkpoints/") and o.endswith("/commit_success.txt")
                  and o.count("/") == 3})
  assert steps == [2, 4, 6]
  metrics = [json.loads(line) for line in
             gcs_emulator.read_object(bucket, "run/train_metrics.jsonl").decode().splitlines()]
  assert [m["step"] for m in metrics] == list(range(1, NUM_STEPS + 1))  # Every step, once.
  assert any(o.startswith("run/tensorboard/events.out.tfevents.") for o in objects)
  result = json.loads(gcs_emulator.read_object(bucket, f"run/eval/metrics_{NUM_STEPS}.json"))
  assert result["step"] == NUM_STEPS and result["per_dataset"]
  assert any(o.startswith("run/synthetic_data/synth_coco/images/") for o in objects)
  _no_local_gs_folder(cwd)


def test_posebh_eval_reads_the_bucket_and_writes_there(gcs_emulator, trained_run):
  bucket, workdir, cwd, _ = trained_run
  out = _run(["posebh_jax.main_eval", f"--config={REPO}/{TINY}", f"--workdir={workdir}"],
             gcs_emulator, cwd)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  written = gcs_emulator.list_objects(bucket, "run/eval_cli/")
  assert f"run/eval_cli/all/metrics_{NUM_STEPS}.json" in written, written
  doc = json.loads(gcs_emulator.read_object(bucket, f"run/eval_cli/all/metrics_{NUM_STEPS}.json"))
  assert doc["step"] == NUM_STEPS
  _no_local_gs_folder(cwd)


def test_posebh_infer_writes_json_and_overlays_to_the_bucket(gcs_emulator, trained_run):
  bucket, workdir, cwd, _ = trained_run
  images = f"{workdir}/synthetic_data/synth_coco/images"
  val = [f"val_{i:06d}" for i in range(2)]
  boxes = f"gs://{bucket}/boxes.json"
  write = (f"from etils import epath; epath.Path({boxes!r}).write_text("
           f"'{{\"{val[0]}.jpg\": [[10, 10, 60, 70, 0.9]]}}')")
  done = subprocess.run([sys.executable, "-c", write], env=_env(gcs_emulator), cwd=cwd,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  out_url = f"gs://{bucket}/infer_out"
  out = _run(["posebh_jax.main_infer", f"--config={REPO}/{TINY}", f"--workdir={workdir}",
              f"--images={images}/{val[0]}.jpg,{images}/{val[1]}.jpg", f"--boxes={boxes}",
              f"--out={out_url}", "--skeletons=synth_coco"], gcs_emulator, cwd)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  written = gcs_emulator.list_objects(bucket, "infer_out/")
  assert written == sorted(f"infer_out/{s}{e}" for s in val for e in (".json", ".png")), written
  doc = json.loads(gcs_emulator.read_object(bucket, f"infer_out/{val[0]}.json"))
  assert doc["image"] == f"{images}/{val[0]}.jpg"
  assert len(doc["instances"]) == 1 and doc["instances"][0]["box"] == [10, 10, 60, 70]
  assert len(doc["instances"][0]["poses"]["synth_coco"]) == 17
  png = gcs_emulator.read_object(bucket, f"infer_out/{val[0]}.png")
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  _no_local_gs_folder(cwd)


def test_tfds_build_targeted_at_the_bucket_then_trained_on(gcs_emulator, gcs_bucket, tmp_path):
  gcs, bucket = gcs_emulator, gcs_bucket
  cwd = str(tmp_path)
  synth = f"gs://{bucket}/synth"
  out = _run(["data_pipelines.synthetic.generate", f"--out={synth}", "--num_train=16",
              "--num_val=4", "--skeletons=synth_coco", "--image_size", "96", "96"], gcs, cwd)
  assert out.returncode == 0, out.stderr[-3000:]
  config = tmp_path / "gcs_tfds_config.py"
  config.write_text(textwrap.dedent(f"""\
      from configs import synthetic

      def get_config(arg=None):
        c = synthetic.get_config("tiny")
        c.data.synthetic.enabled = False
        c.data.root = "{synth}"
        c.data.dataset_names = ("synth_coco",)
        e = c.data.datasets.synth_coco
        e.train_ann = "synth_coco/annotations/train.json"
        e.val_ann = "synth_coco/annotations/val.json"
        e.image_dir = "synth_coco/images"
        c.data.tfds_dir = "gs://{bucket}/tfds"
        c.model.proto.num_clusters = 8  # Fewer than synth_coco's 17 keypoints.
        c.train.num_steps = 2
        c.train.eval_at_end = False
        return c
      """))
  built = _run(["data_pipelines.build_tfds", f"--config={config}"], gcs, cwd)
  assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
  objects = gcs.list_objects(bucket, "tfds/")
  version_dir = "tfds/posebh_keypoints/synth_coco/1.1.0/"  # Builds are keyed by dataset name.
  assert f"{version_dir}dataset_info.json" in objects, objects
  assert any(o.startswith(f"{version_dir}posebh_keypoints-train.array_record") for o in objects)
  # Training can only read the build: the annotation files it came from are gone.
  rm = ("from etils import epath; [epath.Path(p).unlink() for p in "
        f"('{synth}/synth_coco/annotations/train.json', '{synth}/synth_coco/annotations/val.json')]")
  done = subprocess.run([sys.executable, "-c", rm], env=_env(gcs), cwd=cwd, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  trained = _run(["posebh_jax.main_train", f"--config={config}",
                  f"--workdir=gs://{bucket}/tfds_run"], gcs, cwd)
  assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
  assert "tfds_run/checkpoints/2/commit_success.txt" in gcs.list_objects(bucket, "tfds_run/")
  _no_local_gs_folder(cwd)


def test_metrics_log_appends_keep_every_line_on_gcs(gcs_emulator, gcs_bucket, tmp_path):
  path = f"gs://{gcs_bucket}/run/train_metrics.jsonl"
  script = textwrap.dedent(f"""\
      from posebh_jax.train import metrics_log
      for step in range(1, 4):
        metrics_log.append_records({path!r}, [dict(step=step)])
      metrics_log.append_lines({path!r}, ['{{"step": 4}}', '{{"step": 5}}'])
      print([r["step"] for r in metrics_log.read_records({path!r})])
      """)
  out = subprocess.run([sys.executable, "-c", script], env=_env(gcs_emulator), cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "[1, 2, 3, 4, 5]"
  stored = gcs_emulator.read_object(gcs_bucket, "run/train_metrics.jsonl").decode()
  assert [json.loads(line)["step"] for line in stored.splitlines()] == [1, 2, 3, 4, 5]


def test_convert_and_export_read_and_write_the_bucket(gcs_emulator, gcs_bucket, tmp_path):
  """posebh-convert from a gs:// .pth to gs:// weights; those weights exported to gs://."""
  from conftest import shared_path
  pth = shared_path("golden/tiny_posebh.pth")
  gcs, bucket = gcs_emulator, gcs_bucket
  cwd = str(tmp_path)
  src, weights, artifact = (f"gs://{bucket}/in/tiny.pth", f"gs://{bucket}/converted",
                            f"gs://{bucket}/export/coco_head.npz")
  up = subprocess.run([sys.executable, "-c", f"from etils import epath; epath.Path({src!r})"
                       f".write_bytes(open({str(pth)!r}, 'rb').read())"],
                      env=_env(gcs), cwd=cwd, capture_output=True, text=True, timeout=120)
  assert up.returncode == 0, up.stderr
  out = _run(["posebh_jax.main_convert", f"--config={REPO}/configs/posebh.py:tiny_reference",
              f"--pth={src}", f"--out={weights}"], gcs, cwd)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  stored = gcs.list_objects(bucket, "converted/")
  assert any(o.startswith("converted/weights/") for o in stored)
  assert any(o.startswith("converted/meta/") for o in stored)
  script = textwrap.dedent(f"""\
      import numpy as np
      from configs import posebh
      from posebh_jax import export, inference
      p = inference.Predictor.from_checkpoint(posebh.get_config("tiny_reference"), {weights!r},
                                              batch_size=2)
      export.export_skeleton(p, "coco", {artifact!r})
      loaded = export.load_exported({artifact!r})
      crops = np.zeros((1, 256, 192, 3), np.float32)
      print(np.asarray(loaded(crops, np.array([[96.0, 128.0]]), np.array([[0.96, 1.28]]))).shape)
      """)
  done = subprocess.run([sys.executable, "-c", script], env=_env(gcs), cwd=cwd,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1] == "(1, 17, 3)"
  assert "export/coco_head.npz" in gcs.list_objects(bucket, "export/")
  _no_local_gs_folder(cwd)


def _loss_lines(gcs, bucket: str, name: str) -> dict[int, float]:
  lines = gcs.read_object(bucket, name).decode().splitlines()
  steps = [json.loads(line)["step"] for line in lines]
  assert steps == sorted(set(steps)), steps  # Each step once.
  return {json.loads(line)["step"]: json.loads(line)["loss/total"] for line in lines}


def test_damaged_checkpoint_in_the_bucket_is_set_aside_and_training_falls_back(
    gcs_emulator, trained_run):
  """restore_latest on gs://: the damaged newest checkpoint is moved to checkpoints_damaged/ in
  the bucket (copied, then deleted: an object store has no directories to rename), training
  resumes from the one before and reproduces the undamaged run's losses."""
  gcs = gcs_emulator
  bucket, run, cwd, _ = trained_run
  workdir = f"gs://{bucket}/damaged"
  # The trained run's data; JAX's compilation cache in the bucket (the suite's only test of a cache
  # on gs://): the first run compiles into it, the rerun reads it.
  shared = dict(**{"data.root": f"{run}/synthetic_data",
                   "train.compilation_cache": f"{run}/compilation_cache",
                   "train.eval_at_end": False})
  first = _run(_train_args(workdir, **shared), gcs, cwd)
  assert first.returncode == 0, first.stderr[-3000:]
  undamaged = _loss_lines(gcs, bucket, "damaged/train_metrics.jsonl")
  step6 = [o for o in gcs.list_objects(bucket, "damaged/checkpoints/6/")]
  assert "damaged/checkpoints/6/state/_METADATA" in step6
  gcs.delete_object(bucket, "damaged/checkpoints/6/state/_METADATA")

  rerun = _run(_train_args(workdir, **shared), gcs, cwd)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"checkpoint step 6 in {workdir}/checkpoints is damaged, skipped: " in rerun.stderr
  assert (f"resumed from step 4, the newest intact checkpoint; skipped damaged steps 6 (moved "
          f"to {workdir}/checkpoints_damaged)") in rerun.stderr, rerun.stderr[-3000:]
  # Every object of the damaged step kept, under checkpoints_damaged/6; step 6 saved anew.
  moved = gcs.list_objects(bucket, "damaged/checkpoints_damaged/")
  assert moved == sorted(o.replace("checkpoints/6/", "checkpoints_damaged/6/") for o in step6
                         if not o.endswith("state/_METADATA"))
  assert "damaged/checkpoints/6/state/_METADATA" in gcs.list_objects(bucket,
                                                                     "damaged/checkpoints/6/")
  assert _loss_lines(gcs, bucket, "damaged/train_metrics.jsonl") == undamaged
  _no_local_gs_folder(cwd)


def _upload(gcs, cwd, files: dict[str, bytes]) -> None:
  code = "from etils import epath\n" + "".join(
      f"epath.Path({url!r}).write_bytes({data!r})\n" for url, data in files.items())
  up = subprocess.run([sys.executable, "-c", code], env=_env(gcs), cwd=cwd, capture_output=True,
                      text=True, timeout=120)
  assert up.returncode == 0, up.stderr[-3000:]


def test_convert_overwrite_in_the_bucket_replaces_only_converted_weights(
    gcs_emulator, gcs_bucket, tmp_path):
  """posebh-convert --overwrite with a gs:// --out: a training workdir and weights beside a
  user's file are refused in one line, not one object changed; converted weights are replaced."""
  from conftest import shared_path
  gcs, bucket, cwd = gcs_emulator, gcs_bucket, str(tmp_path)
  pth = str(shared_path("golden/tiny_posebh.pth"))
  convert = ["posebh_jax.main_convert", f"--config={REPO}/configs/posebh.py:tiny_reference",
             f"--pth={pth}"]
  _upload(gcs, cwd, {f"gs://{bucket}/wd/{name}": data for name, data in (
      ("checkpoints/2/state/_METADATA", b"{}"), ("train_metrics.jsonl", b'{"step": 1}\n'),
      ("tensorboard/events.out.tfevents.1.host", b"\0" * 32), ("notes.txt", b"mine"))})
  before = {o: gcs.read_object(bucket, o) for o in gcs.list_objects(bucket)}
  r = _run(convert + [f"--out=gs://{bucket}/wd", "--overwrite"], gcs, cwd)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      f"posebh-convert: gs://{bucket}/wd exists and is not converted weights (no "
      f"gs://{bucket}/wd/meta/metadata marked 'posebh-jax converted weights'): --overwrite only "
      "replaces a directory written by posebh-convert; nothing was deleted")
  assert {o: gcs.read_object(bucket, o) for o in gcs.list_objects(bucket)} == before

  out = f"gs://{bucket}/w"
  assert _run(convert + [f"--out={out}"], gcs, cwd).returncode == 0
  _upload(gcs, cwd, {f"{out}/README.txt": b"which run these came from"})
  before = {o: gcs.read_object(bucket, o) for o in gcs.list_objects(bucket)}
  r = _run(convert + [f"--out={out}", "--overwrite"], gcs, cwd)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      f"posebh-convert: {out} holds converted weights and files posebh-convert did not write "
      "(README.txt): not replaced; nothing was deleted")
  assert {o: gcs.read_object(bucket, o) for o in gcs.list_objects(bucket)} == before

  gcs.delete_object(bucket, "w/README.txt")
  old = gcs.read_object(bucket, "w/meta/metadata")
  r = _run(convert + [f"--out={out}", "--overwrite"], gcs, cwd)
  assert r.returncode == 0, r.stderr[-3000:]
  # Replaced (fresh weights, a fresh meta), the workdir untouched, no temporary siblings left.
  assert json.loads(gcs.read_object(bucket, "w/meta/metadata"))["format"] == \
      json.loads(old)["format"]
  assert {o.split("/")[1] for o in gcs.list_objects(bucket, "w/")} == {
      "_CHECKPOINT_METADATA", "commit_success.txt", "weights", "meta"}
  assert {o.split("/")[0] for o in gcs.list_objects(bucket)} == {"w", "wd"}
  _no_local_gs_folder(cwd)
