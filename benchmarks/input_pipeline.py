r"""Input pipeline throughput on the real sample images: our grain path vs. a plain OpenCV loop.

Both sides do the reference's training work per instance (spec §4.4) on the same stream of
records (the five sample datasets of `configs/samples.py`, mixed with equal weights) at the real
sizes (256×192 crops, 64×48 heatmaps padded to 133 channels, the reference's augmentation):
decode the JPEG, random flip, half body, random scale/rotation, affine crop, normalise, Gaussian
targets with weights.

  opencv loop   what the reference's mmpose pipeline does, written plainly: `cv2.imread`, BGR→RGB
                of the whole image, numpy mirror of the whole image, `cv2.warpAffine` of the RGB
                image, joints moved one by one, and the MSRA/UDP targets drawn keypoint by
                keypoint in Python loops (mmpose's `_msra_generate_target` /
                `_udp_generate_target`), padded to 133 and stacked into batches.
  ours (default)
                `pipeline.mixed_train_dataset` with the configs' default compact batch
                (`data.device_targets=True`: uint8 crops + crop-space joints; the step
                normalises and draws the targets on the accelerator), read in the main thread.
  ours, host targets
                the same pipeline with `host_targets=True` (float crops and 133-channel
                heatmaps made on the host), plus, for reference, `device_targets.dataset_targets`
                jitted on this machine's JAX device per batch.

  decode alone, at 1/2, at 1/8
                `cv2.imread`, and `cv2.imdecode` with `IMREAD_REDUCED_COLOR_2/8` (JPEG DCT-domain
                downscaling): the share of the default path that is decoding, and the most a
                reduced decode could gain (printed as ceilings).

First both sides are run on the same records with the same generator and their outputs
compared, so the comparison is of the same work. Throughput is samples per CPU-second of this
process (`time.process_time`, all threads; OpenCV is set to one thread), i.e. per core; wall
time is printed too. Rounds alternate between the sides and the median round is reported, so
load from other processes on the machine hits both alike.

  python benchmarks/input_pipeline.py [--samples=../shared/data/samples] [--n=240] [--rounds=3]

It prints `bytes per sample: N` (what one default training sample ships to the device, PoseBH-B
shapes; goal <= 200,000) and `ratio: R` (the default path's samples per CPU-second over the
OpenCV loop's; goal >= 2.0).

The sample files hold 2-12 instances each; the records are repeated to 10,000 per dataset
(`--tile`) so that grain's index shuffle works on a realistic domain (see `main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any, Callable, Mapping

import cv2
import numpy as np

from configs import samples as samples_config
from data_pipelines import coco_reader, datasets, device_targets, pipeline, transforms
from posebh_jax import experiment


def opencv_sample(record: Mapping[str, Any], rng: np.random.Generator,
                  cfg: pipeline.TopDownConfig) -> dict[str, np.ndarray]:
  """One training example the straightforward way (see the module docstring).

  Returns:
    image [H, W, 3] f32, target [K_max, Hh, Wh] f32, target_weight [K_max] f32.
  """
  d = int(record["dataset_index"])
  skeleton = cfg.layout.skeletons[d]
  udp = cfg.use_udp(d)
  if cfg.center_jitter and cfg.center_jitter[d]:  # The training centre jitter (spec §6.15).
    record = coco_reader.jitter_center_from(dict(record), rng, cfg.center_jitter_prob)
  img = cv2.imread(record["image_path"], cv2.IMREAD_COLOR)
  img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
  joints = record["keypoints"][:, :2].astype(np.float32)
  vis = record["keypoints"][:, 2].astype(np.float32)
  center = record["center"].astype(np.float32)
  scale = record["scale"].astype(np.float32)
  # The reference's random draws in its order (the shared helpers are a few scalar ops each);
  # the flip mirrors the full image with numpy as mmpose does.
  if cfg.flip:
    img, joints, vis, center, _ = transforms.random_flip(
        img, joints, vis, center, skeleton.flip_pairs, rng)
  if cfg.use_half_body(d):
    hb = transforms.half_body_center_scale(
        joints, vis, skeleton.upper_body_ids, cfg.image_size_wh[0] / cfg.image_size_wh[1], rng,
        num_joints_half_body=cfg.num_joints_half_body, prob_half_body=cfg.half_body_prob)
    if hb is not None:
      center, scale = hb
  scale, rot = transforms.random_scale_rotation(
      scale, rng, scale_factor=cfg.scale_factor, rot_factor=cfg.rot_factor,
      rot_prob=cfg.rot_prob)
  trans = transforms.crop_matrix(center, scale, rot, cfg.image_size_wh, udp)
  crop = cv2.warpAffine(np.ascontiguousarray(img), trans, cfg.image_size_wh,
                        flags=cv2.INTER_LINEAR)
  for i in range(len(joints)):  # mmpose: UDP moves every joint, standard only visible ones.
    if udp or vis[i] > 0:
      joints[i] = trans @ np.array([joints[i, 0], joints[i, 1], 1.0], trans.dtype)
  image = (crop.astype(np.float32) / np.float32(255) - transforms.IMAGENET_MEAN) \
      / transforms.IMAGENET_STD
  target, weight = _loop_target(joints, vis, cfg, udp)
  k_max = cfg.layout.max_keypoints
  padded = np.zeros((k_max,) + target.shape[1:], np.float32)
  padded[:len(target)] = target
  padded_weight = np.zeros((k_max,), np.float32)
  padded_weight[:len(weight)] = weight
  return dict(image=image, target=padded, target_weight=padded_weight)


def _loop_target(joints: np.ndarray, vis: np.ndarray, cfg: pipeline.TopDownConfig, udp: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
  """mmpose's per-keypoint target loop: [K, Hh, Wh] heatmaps and [K] weights."""
  (w_img, h_img), (w_hm, h_hm) = cfg.image_size_wh, cfg.heatmap_size_wh
  sigma = cfg.sigma
  tmp = int(sigma * 3)
  size = 2 * tmp + 1
  if udp:
    stride = ((w_img - 1.0) / (w_hm - 1.0), (h_img - 1.0) / (h_hm - 1.0))
  else:
    stride = (w_img / w_hm, h_img / h_hm)
  target = np.zeros((len(joints), h_hm, w_hm), np.float32)
  weight = vis.astype(np.float32).copy()
  for k in range(len(joints)):
    mu_x = int(joints[k, 0] / stride[0] + 0.5)
    mu_y = int(joints[k, 1] / stride[1] + 0.5)
    ul = [mu_x - tmp, mu_y - tmp]
    br = [mu_x + tmp + 1, mu_y + tmp + 1]
    if ul[0] >= w_hm or ul[1] >= h_hm or br[0] < 0 or br[1] < 0:
      weight[k] = 0
      continue
    x = np.arange(0, size, 1, np.float32)
    y = x[:, None]
    if udp:
      x0 = size // 2 + (joints[k, 0] / stride[0] - mu_x)
      y0 = size // 2 + (joints[k, 1] / stride[1] - mu_y)
    else:
      x0 = y0 = size // 2
    g = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma ** 2))
    g_x = max(0, -ul[0]), min(br[0], w_hm) - ul[0]
    g_y = max(0, -ul[1]), min(br[1], h_hm) - ul[1]
    img_x = max(0, ul[0]), min(br[0], w_hm)
    img_y = max(0, ul[1]), min(br[1], h_hm)
    if weight[k] > 0.5:
      target[k, img_y[0]:img_y[1], img_x[0]:img_x[1]] = g[g_y[0]:g_y[1], g_x[0]:g_x[1]]
  return target, weight


def _timed(fn: Callable[[], int]) -> tuple[float, float, int]:
  """(CPU seconds, wall seconds, samples) of one call of `fn` (which returns its samples)."""
  c0, w0 = time.process_time(), time.perf_counter()
  n = fn()
  return time.process_time() - c0, time.perf_counter() - w0, n


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--samples", default="../shared/data/samples", help="sample data root")
  ap.add_argument("--n", type=int, default=240, help="samples per side per round")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--tile", type=int, default=10000, help="records per dataset (repeated)")
  args = ap.parse_args()
  cv2.setNumThreads(1)  # Per core: OpenCV's own threads would blur it (both sides use cv2).

  config = samples_config.get_config()
  config.data.root = args.samples
  config.data.image_size, config.data.heatmap_size = (256, 192), (64, 48)  # The real sizes.
  layout = datasets.build_layout(config)
  td_default = datasets.topdown_config(config, layout)
  # The OpenCV loop makes float crops and heatmaps: compare with the host-target settings.
  td = dataclasses.replace(td_default, host_targets=True)
  files = experiment.resolve_dataset_files(config, "")
  samples, _ = datasets.load_records(config, layout, files, "train")
  # Each dataset's records repeated (references, not copies) to a real dataset's size: grain's
  # index shuffle costs milliseconds per lookup on a 2-12 element domain (~4 µs from ~10^4 on)
  # and would swamp the comparison with an artefact of the tiny sample files.
  sources = [list(r) * -(-args.tile // len(r)) for r in samples]
  weights = [1.0] * len(sources)
  n_total = max(args.n * (args.rounds + 1), 40)  # 40: the same-work check below.
  mixed = pipeline.mixed_records(sources, weights, seed=0)
  stream = [mixed[i] for i in range(n_total)]  # The OpenCV loop's plain list of records.
  print(f"records: {dict(zip(config.data.dataset_names, map(len, samples)))} (each repeated to "
        f"{args.tile}), mixed with equal weights; crops {td.image_size_hw}, heatmaps "
        f"{td.heatmap_size_hw} × {layout.max_keypoints} channels, batch {args.batch}")

  # --- Same work: both sides on the same records with the same generators. --------------------
  ours_transform = pipeline.TopDownTrainTransform(td)
  d_img = d_tgt = 0.0
  w_same = True
  for i in range(40):
    rec = stream[i]
    a = ours_transform.random_map(rec, np.random.default_rng(i))
    b = opencv_sample(rec, np.random.default_rng(i), td)
    d_img = max(d_img, float(np.abs(a["image"] - b["image"]).max()))
    d_tgt = max(d_tgt, float(np.abs(a["target"] - b["target"]).max()))
    w_same &= bool(np.array_equal(a["target_weight"], b["target_weight"]))
  print(f"same outputs on 40 samples: image max |diff| {d_img:.2e}, target max |diff| "
        f"{d_tgt:.2e}, target weights equal: {w_same}")
  if d_img > 1e-5 or d_tgt > 1e-5 or not w_same:  # Else the ratio compares different work.
    raise SystemExit("the OpenCV loop and the pipeline made different training inputs")

  # --- The sides. --------------------------------------------------------------------------------
  nb = max(1, args.n // args.batch)
  n = nb * args.batch
  host_ds = pipeline.mixed_train_dataset(sources, weights, td, batch_size=args.batch, seed=0)
  td_dev = td_default
  assert not td_dev.host_targets, "the configs' default is the compact batch"
  joints_ds = pipeline.mixed_train_dataset(sources, weights, td_dev, batch_size=args.batch,
                                           seed=0)
  targets_fn = device_targets.jitted_dataset_targets(device_targets.TargetSpec.from_topdown(td))
  first = joints_ds[0]
  per_sample = lambda b: sum(np.asarray(v).nbytes for v in b.values()) // args.batch
  default_bytes, host_bytes = per_sample(first), per_sample(host_ds[0])
  # The device's inputs are identical: normalised crops bit for bit, targets to float32 rounding.
  dev_in = {k: np.asarray(v) for k, v in zip(("target", "target_weight"), targets_fn(
      first["joints"], first["joint_vis"], first["dataset_index"]))}
  ref = host_ds[0]
  same_image = np.array_equal(np.asarray(pipeline.normalize_on_device(first["image"])),
                              ref["image"])
  print(f"default (compact) vs host-target batch 0: normalised crops equal: {same_image}; "
        f"targets max |diff| {np.abs(dev_in['target'] - ref['target']).max():.1e}; "
        f"weights equal: {np.array_equal(dev_in['target_weight'], ref['target_weight'])}")
  targets_fn(first["joints"], first["joint_vis"], first["dataset_index"])[0].block_until_ready()
  joint_batches = [joints_ds[i] for i in range(nb)]  # Inputs of the device-target timing.
  offset = [0]

  def opencv_loop() -> int:
    base = offset[0]
    for start in range(base, base + n, args.batch):
      examples = [opencv_sample(stream[i], np.random.default_rng(i), td)
                  for i in range(start, start + args.batch)]
      # Collated into batches like ours (and the reference's DataLoader).
      {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    return n

  def decode_only() -> int:
    base = offset[0]
    for i in range(base, base + n):
      cv2.imread(stream[i]["image_path"], cv2.IMREAD_COLOR)
    return n

  def decode_reduced(factor: int) -> Callable[[], int]:
    flag = getattr(cv2, f"IMREAD_REDUCED_COLOR_{factor}")

    def run() -> int:
      base = offset[0]
      for i in range(base, base + n):
        cv2.imdecode(np.fromfile(stream[i]["image_path"], np.uint8), flag)
      return n
    return run

  def ours(ds) -> Callable[[], int]:
    def run() -> int:
      base = offset[0] // args.batch
      for i in range(base, base + nb):
        ds[i]
      return n
    return run

  def device_only() -> int:
    for b in joint_batches:
      targets_fn(b["joints"], b["joint_vis"], b["dataset_index"])[0].block_until_ready()
    return n

  def host_target_only() -> int:
    spec = device_targets.TargetSpec.from_topdown(td)
    for b in joint_batches:
      device_targets.numpy_targets(b["joints"], b["joint_vis"],
                                   [td.use_udp(int(d)) for d in b["dataset_index"]], spec)
    return n

  sides = {
      "opencv loop (decode+augment+target+normalise)": opencv_loop,
      "ours: grain pipeline, host targets": ours(host_ds),
      "ours (default): compact batch, targets on the device": ours(joints_ds),
      "device targets (jitted, this machine's JAX device)": device_only,
      "host targets alone (numpy encoders)": host_target_only,
      "decode alone (cv2.imread)": decode_only,
      # JPEG DCT-domain downscaling: the entropy decoding of the whole file remains.
      "decode at 1/2 alone (IMREAD_REDUCED_COLOR_2)": decode_reduced(2),
      "decode at 1/8 alone (IMREAD_REDUCED_COLOR_8)": decode_reduced(8),
  }
  runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in sides}
  for r in range(args.rounds):
    offset[0] = r * n  # Fresh records (and draws) each round.
    for name, fn in sides.items():
      runs[name].append(_timed(fn))

  def rate(name: str) -> tuple[float, float]:
    cpu = statistics.median(c for c, _, _ in runs[name])
    wall = statistics.median(w for _, w, _ in runs[name])
    return n / cpu, n / wall

  print(f"\n{n} samples per side per round, median of {args.rounds} rounds "
        f"(samples per CPU-second = per core; wall in brackets):")
  for name in sides:
    cpu_rate, wall_rate = rate(name)
    print(f"  {name:58s} {cpu_rate:8.1f} /s  ({wall_rate:.1f} /s wall)")
  base = rate("opencv loop (decode+augment+target+normalise)")[0]
  host = rate("ours: grain pipeline, host targets")[0]
  joints_only = rate("ours (default): compact batch, targets on the device")[0]
  dev = rate("device targets (jitted, this machine's JAX device)")[0]
  combined = 1.0 / (1.0 / joints_only + 1.0 / dev)
  decode = rate("decode alone (cv2.imread)")[0]
  print(f"\nbytes per sample: {default_bytes} (default compact batch; host targets: "
        f"{host_bytes}; goal <= 200,000)")
  print(f"ratio: {joints_only / base:.2f} (default path, host work per sample that feeds the "
        f"accelerator, vs the opencv loop; goal >= 2.0)")
  print(f"ratio ours with host targets / opencv loop: {host / base:.2f}x")
  print(f"ratio ours with device targets computed on this same CPU (host + device time) / "
        f"opencv loop: {combined / base:.2f}x")
  print(f"decode alone is {decode / base:.2f}x the opencv loop's rate: the ceiling of any "
        f"per-instance pipeline that decodes the full image")
  # What the default path spends besides the full decode, and the ratio it would reach if every
  # image were decoded at 1/2 or 1/8 instead (an upper bound for reduced decoding: in training
  # only crops that downscale by that factor could use it, and their pixels would change).
  rest = 1.0 / joints_only - 1.0 / decode
  print(f"default path: {1e3 / joints_only:.2f} ms CPU per sample, of which full decode "
        f"{1e3 / decode:.2f} ms ({joints_only / decode:.0%}), the rest {1e3 * rest:.2f} ms")
  for f in (2, 8):
    reduced = rate(f"decode at 1/{f} alone (IMREAD_REDUCED_COLOR_{f})")[0]
    print(f"ceiling with every image decoded at 1/{f}: ratio "
          f"{1.0 / (1.0 / reduced + rest) / base:.2f}")


if __name__ == "__main__":
  main()
