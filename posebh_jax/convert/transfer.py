r"""Starting weights for transfer to a new dataset, from a multi-dataset PoseBH checkpoint.

The reference's README "Transfer": remove the keypoint prototypes from the PoseBH checkpoint
(`tools/remove_proto.py`) and load the rest into the transfer model, which has one dataset with
its own new heatmap head and new prototypes. Here the transfer model is a `PoseBHModel` with one
dataset (one MoE expert, one head):

* backbone: every shared weight as stored; the MoE expert slice of one source dataset
  (`expert`, default 0 = COCO's, the reference's transfer configs route with `dataset_idx=0`);
* prototype head (the keypoint embedding): as stored (the transfer configs freeze it);
* heatmap head: freshly initialised for the new skeleton (`seed`);
* keypoint prototypes and cluster tables: not written, so training initialises them fresh.

  python -m posebh_jax.convert.transfer --source_config=configs/posebh.py:b \
      --source=/ckpt/posebh_b_converted --config=configs/transfer.py:pw3d \
      --out=/ckpt/posebh_b_to_pw3d
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from posebh_jax.convert import weights as weights_lib


def derive_transfer_weights(source_config: ml_collections.ConfigDict, source_dir: str,
                            target_config: ml_collections.ConfigDict, out_dir: str, *,
                            expert: int = 0, seed: int = 0, overwrite: bool = False) -> dict:
  """Writes converted weights for `target_config`'s one-dataset model (module docstring).

  Args:
    source_config: the config whose model `source_dir` fits (e.g. `configs/posebh.py:b`).
    source_dir: converted PoseBH weights (`posebh-convert --out`).
    target_config: the transfer config (one dataset; same backbone and prototype head sizes).
    out_dir: where to write (`init.weights` of the transfer run).
    expert: which source dataset's MoE expert the backbone keeps.
    seed: initialisation of the new heatmap head.

  Returns:
    The meta written with the weights.

  Raises:
    ValueError: a target with more than one dataset, an expert out of range, or backbone /
      prototype-head shapes that differ between source and target (leaves named).
  """
  from data_pipelines import datasets
  from posebh_jax import experiment

  src_layout = datasets.build_layout(source_config)
  tgt_layout = datasets.build_layout(target_config)
  if tgt_layout.num_datasets != 1:
    raise ValueError(f"the transfer config has {tgt_layout.num_datasets} datasets; expected one")
  if not 0 <= expert < src_layout.num_datasets:
    raise ValueError(f"expert={expert}: the source has {src_layout.num_datasets} datasets")
  src_model = experiment.build_model(source_config, src_layout)
  tgt_model = experiment.build_model(target_config, tgt_layout)
  src, _ = weights_lib.load_weights(
      source_dir, src_model, num_prototype_keypoints=src_layout.total_keypoints,
      num_in_class=source_config.model.proto.num_in_class)

  h, w = tuple(target_config.data.image_size)
  fresh = tgt_model.init({"params": jax.random.key(seed)}, np.zeros((1, h, w, 3), np.float32),
                         np.zeros((1,), np.int32), train=False)
  out: dict[str, Any] = {}
  problems = []
  kept_from_source = 0
  for collection in ("params", "batch_stats"):
    stored = traverse_util.flatten_dict(getattr(src, collection) or {}, sep="/")
    new = traverse_util.flatten_dict(jax.device_get(fresh.get(collection, {})), sep="/")
    for name, init in new.items():
      if name.startswith("heads_"):  # The new skeleton's head: fresh.
        continue
      if name not in stored:
        problems.append(f"{collection}/{name}: not in the source")
        continue
      value = np.asarray(stored[name])
      if name.endswith(("experts_kernel", "experts_bias")):
        value = value[expert:expert + 1]
      if value.shape != init.shape:
        problems.append(f"{collection}/{name}: source {value.shape}, target {init.shape}")
        continue
      new[name] = value
      kept_from_source += 1
    out[collection] = traverse_util.unflatten_dict(new, sep="/")
  if problems:
    raise ValueError("the source weights do not fit the transfer model:\n  " +
                     "\n  ".join(problems))
  meta = dict(source=str(source_dir), transfer=dict(
      expert=int(expert), seed=int(seed), dataset=list(target_config.data.dataset_names),
      from_source=kept_from_source, note="heatmap head fresh; prototypes not stored (fresh)"))
  weights_lib.save_weights(out_dir, weights_lib.PretrainedWeights(
      params=out["params"], batch_stats=out["batch_stats"], prototypes=None,
      cluster_prototypes=None, cluster_keypoint=None), meta, overwrite=overwrite)
  return meta


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` → its `get_config(arg)` (as --config flags read it)."""
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_transfer_config", path)
  if module_spec is None:
    raise FileNotFoundError(f"no config file {path}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def main(argv=None) -> None:
  import argparse

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for flag in ("source_config", "source", "config", "out"):
    p.add_argument(f"--{flag}", required=True)
  p.add_argument("--expert", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--overwrite", action="store_true")
  a = p.parse_args(argv)
  try:
    meta = derive_transfer_weights(load_config(a.source_config), a.source,
                                   load_config(a.config), a.out, expert=a.expert, seed=a.seed,
                                   overwrite=a.overwrite)
  except (ValueError, FileNotFoundError, OSError) as e:
    raise SystemExit(f"transfer: {e}") from None
  print(f"wrote {a.out} ({meta['transfer']['from_source']} leaves from {a.source})")


if __name__ == "__main__":
  main()
