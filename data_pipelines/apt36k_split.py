r"""APT-36K's train/val/test split as the paper's authors made it (their
`tools/dataset/prepro_apt36k.py`), from the released `apt36k_annotations.json`.

  python -m data_pipelines.apt36k_split --raw=/data/ap36k/annotations/apt36k_annotations.json \
      --out_dir=/data/ap36k/annotations

writes `train_annotations_1.json`, `val_annotations_1.json` and `test_annotations_1.json`
(the names `configs/posebh.py` reads; local or gs://). The rule, exactly as the authors':

* each image's category is the third-from-last part of its Windows path (`file_name` split at
  backslashes); per category, the list of the *images'* video ids in file order (one entry per
  image, so a video counts as often as it has frames) is cut at `int((n + 1) * 0.7)` and
  `int((n + 1) * 0.8)` into train / val / test video ids (about 7:1:2);
* an image or annotation goes to train if its `video_id` is among the train ids, else to val if
  among the val ids, else to test (a video cut by a boundary goes to the earlier split);
* `file_name` becomes the last three path parts joined with "/", with the authors' five fixes of
  mis-encoded folder names; annotations' `is_crowd` is renamed `iscrowd`;
* categories are sorted by id; `license` and `info` are copied.

The authors report train 24,937 images / 36,957 instances, val 3,603 / 5,443, test 6,943 /
10,734. The reference evaluates APT-36K on the val file (spec §5.1).
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

from etils import epath

OUTPUT_NAMES = {"train": "train_annotations_1.json", "val": "val_annotations_1.json",
                "test": "test_annotations_1.json"}

# The authors' fixes of folder names that their Windows tools wrote in another encoding.
_FOLDER_FIXES = {
    "clip46√": "clip46б╠",
    "video11_clip6_1m44s-1m46s_frame╬╩╠Γ": "video11_clip6_1m44s-1m46s_frameиpиmиdжг",
    "video20_clip5_1m44s-1m46s_frame╬╩╠Γ": "video20_clip5_1m44s-1m46s_frameиpиmиdжг",
    "video2_clip3_0m55s-0m57s_frame╬╩╠Γ": "video2_clip3_0m55s-0m57s_frameиpиmиdжг",
    "v2c21太多": "v2c21╠л╢р",
}


def _empty(raw: dict[str, Any]) -> dict[str, Any]:
  return dict(license=copy.deepcopy(raw.get("license")),
              categories=sorted(copy.deepcopy(raw["categories"]), key=lambda c: c["id"]),
              info=copy.deepcopy(raw.get("info")), images=[], annotations=[])


def split_video_ids(images: list[dict[str, Any]]) -> dict[str, set]:
  """Train / val / test video ids by the authors' per-category rule (module docstring)."""
  per_category: dict[str, list] = {}
  for img in images:
    category = img["file_name"].split("\\")[-3]
    per_category.setdefault(category, []).append(img["video_id"])
  out = {"train": set(), "val": set(), "test": set()}
  for vids in per_category.values():
    a, b = int((len(vids) + 1) * 0.7), int((len(vids) + 1) * 0.8)
    out["train"].update(vids[:a])
    out["val"].update(vids[a:b])
    out["test"].update(vids[b:])
  return out


def _split_of(video_id: Any, ids: dict[str, set]) -> str:
  if video_id in ids["train"]:
    return "train"
  return "val" if video_id in ids["val"] else "test"


def split_apt36k(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """The released annotation dict → {"train", "val", "test"} COCO dicts (module docstring).

  Raises:
    ValueError: an image whose path has fewer than three backslash-separated parts, or a record
      without `video_id` (names it).
  """
  for img in raw["images"]:
    if "video_id" not in img or len(img.get("file_name", "").split("\\")) < 3:
      raise ValueError(f"image {img.get('id')!r}: needs 'video_id' and a file_name with at least "
                       f"three backslash-separated parts, got {img.get('file_name')!r}")
  ids = split_video_ids(raw["images"])
  out = {s: _empty(raw) for s in OUTPUT_NAMES}
  for img in raw["images"]:
    parts = img["file_name"].split("\\")[-3:]
    parts[-2] = _FOLDER_FIXES.get(parts[-2], parts[-2])
    new = dict(img, file_name="/".join(parts))
    out[_split_of(img["video_id"], ids)]["images"].append(new)
  for ann in raw["annotations"]:
    if "video_id" not in ann:
      raise ValueError(f"annotation {ann.get('id')!r}: no 'video_id'")
    new = {("iscrowd" if k == "is_crowd" else k): v for k, v in ann.items()}
    out[_split_of(ann["video_id"], ids)]["annotations"].append(new)
  return out


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--raw", required=True, help="apt36k_annotations.json (local or gs://)")
  p.add_argument("--out_dir", required=True, help="Where the three split files go.")
  args = p.parse_args(argv)
  try:
    raw = json.loads(epath.Path(args.raw).read_text(encoding="utf-8"))
    splits = split_apt36k(raw)
  except (OSError, ValueError, KeyError) as e:
    raise SystemExit(f"apt36k_split: {args.raw}: {e}") from None
  out_dir = epath.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  for split, doc in splits.items():
    path = out_dir / OUTPUT_NAMES[split]
    path.write_text(json.dumps(doc))
    print(f"{split}: {len(doc['images'])} images, {len(doc['annotations'])} annotations → {path}")


if __name__ == "__main__":
  main()
