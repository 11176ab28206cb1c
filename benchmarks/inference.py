r"""Batched top-down inference: instances/s with flip test and decoding, and the share of the time
spent outside the model, in one process run.

Three timings (best of `--repeats`, taking turns) of the same boxes (person detections on the sample COCO images, or random boxes
on synthetic images when ../shared is absent), after a warm-up that compiles everything:

  full        `TopDownPredictor.predict_records`: read each image once, crop every box with the
              skeleton's affine (cv2) and normalise on the host, transfer, forward of the crops
              and their flips, flip-back (+ shift), DARK-UDP / default decoding and
              back-projection on device, keypoints back to the host. What `posebh-infer` and
              evaluation run.
  device fn   the jitted crops → keypoints function alone on batches already on the device
              (forward + flip merge + decode).
  model       the model's forward alone (backbone + the skeleton's head on 2B crops: the batch
              and its flips), no flip merge, no decoding, inputs on the device.

It prints instances/s of each, full / model (the ratio) and the share outside the model
(1 − model / full), split into host work (image reading, cropping, transfers) and on-device
flip merge + decoding. On CPU the host and the "device" share the same cores, so only the
ratios mean something; absolute numbers count on an accelerator.

  python benchmarks/inference.py                         # tiny reference model, batch 16
  python benchmarks/inference.py --size=b --batch=8      # PoseBH-B sizes (untrained weights)
  python benchmarks/inference.py --weights=converted/posebh_b --size=b --batch=64
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import posebh as posebh_configs
from data_pipelines import readers
from posebh_jax.inference import Predictor

SAMPLES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "samples"


def sample_records(config, layout, a: int, num_boxes: int, tmpdir: str) -> list[dict]:
  """`num_boxes` box records: COCO sample detections (repeated to fill), else synthetic."""
  ann, det = SAMPLES / "coco" / "test_coco.json", SAMPLES / "coco" / "test_coco_det_AP_H_56.json"
  if ann.is_file() and det.is_file():
    records, _ = readers.read_dataset(
        "coco", str(ann), str(ann.parent), layout.skeletons[a], a,
        image_size_hw=tuple(config.data.image_size), padding=config.data.bbox_padding,
        det_path=str(det))
  else:  # Self-contained fallback: 4 noise images with 30 random boxes each.
    import cv2
    from data_pipelines import transforms
    rng = np.random.default_rng(0)
    records = []
    h, w = config.data.image_size
    for i in range(4):
      path = os.path.join(tmpdir, f"synthetic_{i}.jpg")
      cv2.imwrite(path, rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
      for j in range(30):
        box = [rng.uniform(0, 400), rng.uniform(0, 250), rng.uniform(40, 240),
               rng.uniform(80, 230)]
        c, s = transforms.box_to_center_scale(box, w / h, padding=config.data.bbox_padding)
        records.append(dict(image_path=path, image_id=i, bbox_id=j, center=c, scale=s))
  return [records[i % len(records)] for i in range(num_boxes)]


def timed(fns: dict, repeats: int) -> dict[str, float]:
  """Best-of-`repeats` seconds of each `fn()` (each must block until its result is ready).

  The functions take turns within each repeat, so load from other processes on a shared
  machine hits all of them alike; the minimum is the least disturbed run.
  """
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return {name: min(ts) for name, ts in times.items()}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="tiny_reference", help="configs/posebh.py argument")
  p.add_argument("--weights", default=None, help="converted weights (default: untrained init)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--num_boxes", type=int, default=64)
  p.add_argument("--skeleton", default="coco")
  p.add_argument("--through", default="head", choices=("head", "prototypes"))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default=None, help="also write the numbers here")
  a = p.parse_args()

  config = posebh_configs.get_config(a.size)
  kwargs = dict(batch_size=a.batch, flip_test=True)
  predictor = (Predictor.from_checkpoint(config, a.weights, **kwargs) if a.weights
               else Predictor.from_init(config, **kwargs))
  k = predictor.skeleton_index(a.skeleton)
  core, dec = predictor.core, predictor.core.decoding(k)
  variables = (predictor.params, predictor.batch_stats, predictor.prototypes)
  import tempfile
  with tempfile.TemporaryDirectory() as tmpdir:
    records = sample_records(config, predictor.layout, k, a.num_boxes, tmpdir)
    n = len(records)

    def full():
      core.predict_records(*variables, records, k, through=a.through)

    # The same batches, prepared once and placed on the device, for the two device-only timings.
    batches = [core._device_batch(*b) for b in core.record_batches(records, k)]
    predict_fn = core.predict_fn(k, a.through)

    def device_fn():
      jax.block_until_ready([predict_fn(*variables, *b) for b in batches])

    model = predictor.model

    @jax.jit
    def forward(params, batch_stats, prototypes, crops):
      both = jnp.concatenate([crops, crops[:, :, ::-1]], axis=0)  # As the flip test runs it.
      out = model.apply({"params": params, "batch_stats": batch_stats}, both,
                        jnp.full((both.shape[0],), k, jnp.int32), train=False)
      if a.through == "head":
        return out.heatmaps[k]
      own = prototypes[dec.keypoint_offset:dec.keypoint_offset + dec.num_keypoints]
      from posebh_jax.objective.prototypes import prototype_heatmap
      return prototype_heatmap(out.embedding, own)

    def model_only():
      jax.block_until_ready([forward(*variables, b[0]) for b in batches])

    def host_only():  # Image reading, cropping, normalising, padding and the transfer.
      jax.block_until_ready([core._device_batch(*b) for b in core.record_batches(records, k)])

    for fn in (full, device_fn, model_only, host_only):  # Warm-up: compile, caches.
      fn()
    t = timed(dict(full=full, device=device_fn, model=model_only, host=host_only), a.repeats)
    t_full, t_device, t_model, t_host = t["full"], t["device"], t["model"], t["host"]

  outside = 1.0 - t_model / t_full
  print(f"device: {jax.devices()[0].device_kind}; config posebh.py:{a.size} "
        f"({'converted' if a.weights else 'untrained'} weights), skeleton {a.skeleton} "
        f"through {a.through}, {n} boxes, batch {a.batch} (+ flips), "
        f"crop {tuple(config.data.image_size)}, {'UDP/DARK-UDP' if dec.use_udp else 'standard'}")
  print(f"full predict (host + device):  {t_full:8.3f} s  {n / t_full:9.1f} instances/s")
  print(f"device fn (model+flip+decode): {t_device:8.3f} s  {n / t_device:9.1f} instances/s")
  print(f"model forward only:            {t_model:8.3f} s  {n / t_model:9.1f} instances/s")
  print(f"host only (read, crop, put):   {t_host:8.3f} s")
  print(f"full / model = {t_full / t_model:.2f}x; outside the model: {100 * outside:.0f} % of "
        f"the full time (flip merge + decode on device {100 * (t_device - t_model) / t_full:.0f}"
        f" %, host and transfers {100 * (t_full - t_device) / t_full:.0f} %)")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(size=a.size, batch=a.batch, boxes=n, skeleton=a.skeleton, through=a.through,
                     full_s=t_full, device_fn_s=t_device, model_s=t_model, host_s=t_host,
                     outside_share=outside, device=jax.devices()[0].device_kind), f, indent=1)


if __name__ == "__main__":
  main()
