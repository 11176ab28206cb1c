r"""Writes the synthetic multi-skeleton datasets as COCO keypoint files.

Three datasets stand in for COCO, AI Challenger and AP-10K: `synth_coco` and `synth_aic` are
bipeds annotated with the 17-point COCO-ordered and the 14-point AIC-ordered skeletons (different
random figures in each), `synth_ap10k` quadrupeds with the 17-point AP-10K skeleton. Each
annotation also carries `full_keypoints`: the ground truth of every synthetic skeleton of the
same body type, so accuracy on keypoints a dataset does not annotate can be measured.

Layout under `out_dir`:

  <name>/images/<split>_<000123>.jpg        (out_dir may be local or gs://)
  <name>/annotations/{train,val}.json
  manifest.json          written last; its presence with equal parameters means "done"

Every image is drawn from `np.random.default_rng([seed, dataset, split, index])`, so the output
does not depend on generation order or on the number of worker processes.

  python -m data_pipelines.synthetic.generate --out /tmp/synth --num_train 2000 --num_val 200
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import time
from typing import Any, Sequence

import cv2
import numpy as np

from data_pipelines import storage
from data_pipelines.skeletons import SYNTHETIC_SKELETONS
from data_pipelines.synthetic import render

# Bump when the renderer or the file format changes, so cached datasets are rebuilt.
GENERATOR_VERSION = 2
SPLITS = ("train", "val")
JPEG_QUALITY = 90
MANIFEST = "manifest.json"
_IMAGE_NAME = re.compile(r"^(train|val)_\d{6}\.jpg$")
_CATEGORY = {render.BIPED: "person", render.QUADRUPED: "animal"}
# With `domain_styles`, each dataset's look (`render.STYLES`): the COCO-like and AIC-like sets
# become different domains, as COCO and AI Challenger are (issue 18). AP-10K keeps the default.
DOMAIN_STYLES = {"synth_coco": "coco_like", "synth_aic": "aic_like"}


def _write_json(path: str, obj: Any) -> None:
  """Writes atomically (local or gs://): readers never see a half-written file."""
  storage.write_text(path, json.dumps(obj, separators=(",", ":")))  # dumps: the C encoder.


def _flat_keypoints(keypoints: dict[str, tuple[float, float, int]],
                    names: Sequence[str]) -> list[float | int]:
  """Landmarks → flat COCO [x1, y1, v1, x2, ...] in the order of `names`."""
  out: list[float | int] = []
  for n in names:
    x, y, v = keypoints[n]
    out += [round(x, 2), round(y, 2), int(v)]
  return out


def _same_body(name: str) -> list[str]:
  """Names of all synthetic skeletons sharing `name`'s body type (its own included)."""
  body = SYNTHETIC_SKELETONS[name].body_type
  return [s.name for s in SYNTHETIC_SKELETONS.values() if s.body_type == body]


def _render_job(job: tuple[str, str, int, int, int, int, tuple[int, int], str | None]
                ) -> dict[str, Any]:
  """Renders and writes one image; returns its COCO annotation (ids filled in by the caller).

  Args:
    job: (image path, dataset name, seed, dataset index, split index, image index, (H, W),
      style name or None).
  """
  path, name, seed, d, split, i, image_size, style = job
  skel = SYNTHETIC_SKELETONS[name]
  sample = render.render_sample(np.random.default_rng([seed, d, split, i]), skel.body_type,
                                image_size, style)
  ok, buf = cv2.imencode(".jpg", sample.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
  if not ok:
    raise RuntimeError(f"JPEG encoding failed for {path}")
  # Atomic (local or gs://), so a concurrent identical run never shows torn files.
  storage.write_bytes(path, buf.tobytes())
  full = {s: _flat_keypoints(sample.keypoints, SYNTHETIC_SKELETONS[s].keypoint_names)
          for s in _same_body(name)}
  kpts = full[name]
  x, y, w, h = (round(v, 2) for v in sample.bbox)
  return dict(category_id=1, bbox=[x, y, w, h], area=round(w * h, 2), iscrowd=0,
              num_keypoints=sum(1 for v in kpts[2::3] if v > 0), keypoints=kpts,
              full_keypoints=full)


def _pool_init() -> None:
  cv2.setNumThreads(1)  # The pool is the parallelism; OpenCV threads would only contend.


def _coco_file(name: str, split: str, anns: list[dict[str, Any]],
               image_size: tuple[int, int]) -> dict[str, Any]:
  """Assembles one COCO keypoint file from per-image annotations in index order."""
  skel = SYNTHETIC_SKELETONS[name]
  h, w = image_size
  images, annotations = [], []
  for i, ann in enumerate(anns):
    images.append(dict(id=i + 1, file_name=f"{split}_{i:06d}.jpg", width=w, height=h))
    annotations.append(dict(id=i + 1, image_id=i + 1, **ann))
  category = dict(id=1, name=_CATEGORY[skel.body_type], keypoints=list(skel.keypoint_names),
                  skeleton=[[a + 1, b + 1] for a, b in skel.limbs])
  return dict(images=images, annotations=annotations, categories=[category])


def _paths(out_dir: str, name: str) -> dict[str, str]:
  root = storage.join(out_dir, name)
  return dict(train=storage.join(root, "annotations", "train.json"),
              val=storage.join(root, "annotations", "val.json"),
              image_dir=storage.join(root, "images"))


def _up_to_date(out_dir: str, params: dict[str, Any], names: Sequence[str]) -> bool:
  try:
    manifest = json.loads(storage.read_text(storage.join(out_dir, MANIFEST)))
  except (OSError, ValueError):
    return False
  if manifest.get("params") != params:
    return False
  return all(storage.is_file(_paths(out_dir, n)[s]) for n in names for s in SPLITS)


def generate_synthetic_datasets(
    out_dir: str, *, num_train: int = 2000, num_val: int = 200, seed: int = 0,
    image_size: tuple[int, int] = (192, 192),
    skeletons: Sequence[str] = ("synth_coco", "synth_aic", "synth_ap10k"),
    num_workers: int = 0, domain_styles: bool = False) -> dict[str, dict[str, str]]:
  """Generates the synthetic datasets under `out_dir`, or reuses them if already there.

  Idempotent: when `out_dir/manifest.json` holds the same parameters (and the annotation files
  exist) nothing is written. Otherwise the manifest is removed first and rewritten only after all
  images and annotation files are complete, so an interrupted run is redone next time.

  Args:
    out_dir: output root, local or a URL (gs://...).
    num_train: images in each dataset's train split.
    num_val: images in each dataset's val split.
    seed: base seed; each image uses `default_rng([seed, dataset, split, index])`, where dataset
      is the position of the name in `SYNTHETIC_SKELETONS` (so a subset of datasets
      gets the same images as the full set).
    image_size: (H, W) of the images.
    skeletons: dataset names, each a key of `SYNTHETIC_SKELETONS`.
    num_workers: processes to render with; 0 renders in this process. The output is identical.
    domain_styles: render each dataset in its own style (`DOMAIN_STYLES`), so the datasets are
      different domains; False: one look for all (the default, as before).

  Returns:
    {dataset name: {"train": train json path, "val": val json path, "image_dir": dir}}.
  """
  names = list(skeletons)
  known = list(SYNTHETIC_SKELETONS)
  for n in names:
    if n not in known:
      raise ValueError(f"unknown synthetic dataset {n!r}; known: {known}")
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate dataset names in {names}")
  if num_train < 0 or num_val < 0:
    raise ValueError(f"image counts must be >= 0, got num_train={num_train}, num_val={num_val}")
  h, w = (int(v) for v in image_size)
  if h < 16 or w < 16:
    raise ValueError(f"image_size must be at least 16x16, got {image_size}")

  out_dir = storage.absolute(out_dir)
  params = dict(generator_version=GENERATOR_VERSION, num_train=int(num_train),
                num_val=int(num_val), seed=int(seed), image_size=[h, w], skeletons=names,
                jpeg_quality=JPEG_QUALITY)
  if domain_styles:  # Only then: manifests of unstyled data stay valid.
    params["domain_styles"] = True
  result = {n: _paths(out_dir, n) for n in names}
  if _up_to_date(out_dir, params, names):
    return result

  start = time.time()
  storage.makedirs(out_dir)
  manifest_path = storage.join(out_dir, MANIFEST)
  if storage.exists(manifest_path):
    storage.remove(manifest_path)

  counts = dict(train=int(num_train), val=int(num_val))
  jobs = []
  for n in names:
    paths = result[n]
    storage.makedirs(paths["image_dir"])
    storage.makedirs(storage.dirname(paths["train"]))
    for split_index, split in enumerate(SPLITS):
      jobs += [(storage.join(paths["image_dir"], f"{split}_{i:06d}.jpg"), n, int(seed),
                known.index(n), split_index, i, (h, w),
                DOMAIN_STYLES.get(n) if domain_styles else None) for i in range(counts[split])]

  if num_workers > 0 and len(jobs) > 1:
    ctx = multiprocessing.get_context("spawn")  # Fork is unsafe once JAX threads exist.
    with ctx.Pool(num_workers, initializer=_pool_init) as pool:
      anns = pool.map(_render_job, jobs, chunksize=max(1, min(64, len(jobs) // (4 * num_workers))))
  else:
    anns = [_render_job(j) for j in jobs]

  pos = 0
  for n in names:
    for split in SPLITS:
      k = counts[split]
      _write_json(result[n][split], _coco_file(n, split, anns[pos:pos + k], (h, w)))
      pos += k
    _remove_stale_images(result[n]["image_dir"], counts)

  datasets = {n: {k: p[len(out_dir):].lstrip("/") for k, p in result[n].items()} for n in names}
  manifest = dict(params=params, datasets=datasets, seconds=round(time.time() - start, 2))
  _write_json(manifest_path, manifest)
  return result


def _remove_stale_images(image_dir: str, counts: dict[str, int]) -> None:
  """Deletes images of an earlier, larger generation (only files named like ours)."""
  try:
    names = storage.listdir(image_dir)
  except FileNotFoundError:  # Nothing written (no images asked for; object stores).
    return
  for f in names:
    if _IMAGE_NAME.match(f):
      split, index = f[:-4].split("_")
      if int(index) >= counts[split]:
        storage.remove(storage.join(image_dir, f))


def summarize(paths: dict[str, dict[str, str]]) -> str:
  """One line per dataset and split: image count and keypoint visibility fractions."""
  lines = []
  for name, p in paths.items():
    for split in SPLITS:
      data = json.loads(storage.read_text(p[split]))
      v = np.array([a["keypoints"][2::3] for a in data["annotations"]]).reshape(-1)
      frac = [float(np.mean(v == k)) if v.size else 0.0 for k in (2, 1, 0)]
      lines.append(f"{name:12s} {split:5s} {len(data['images']):6d} images  visible {frac[0]:.3f}"
                   f"  occluded {frac[1]:.3f}  outside {frac[2]:.3f}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="output directory (local or gs://...)")
  parser.add_argument("--num_train", type=int, default=2000)
  parser.add_argument("--num_val", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--image_size", type=int, nargs=2, default=(192, 192), metavar=("H", "W"))
  parser.add_argument("--skeletons", default="synth_coco,synth_aic,synth_ap10k",
                      help="comma-separated dataset names")
  parser.add_argument("--num_workers", type=int, default=0)
  parser.add_argument("--domain_styles", action="store_true",
                      help="render each dataset in its own style (different domains)")
  args = parser.parse_args(argv)

  names = tuple(n for n in args.skeletons.split(",") if n)
  manifest_path = storage.join(args.out, MANIFEST)
  # The manifest records the generation time: unchanged content means nothing was written.
  before = storage.read_text(manifest_path) if storage.exists(manifest_path) else None
  start = time.time()
  paths = generate_synthetic_datasets(
      args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
      image_size=tuple(args.image_size), skeletons=names, num_workers=args.num_workers,
      domain_styles=args.domain_styles)
  seconds = time.time() - start
  print(summarize(paths))
  total = (args.num_train + args.num_val) * len(names)
  if before is not None and storage.read_text(manifest_path) == before:
    print(f"{args.out} is up to date ({total} images); nothing written")
  else:
    print(f"generated {total} images in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} images/s)")


if __name__ == "__main__":
  main()
