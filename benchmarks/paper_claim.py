r"""The paper's claim at laptop scale: ViTPose++-style multi-head baseline vs PoseBH, same budget.

Trains `configs/synthetic.py:baseline` (multi-head only) and `configs/synthetic.py` (PoseBH: the
prototype stage, then CPS + CSS) on the same synthetic multi-skeleton data, with the same
steps, batch, optimizer and backbone, for each seed, and prints side by side:

  * per-dataset PCK (each dataset's own skeleton on its own held-out images), and
  * cross-skeleton PCK: the keypoints of skeleton a predicted on the images of dataset b ≠ a,
    over all of a's keypoints and over the "novel" ones only (names b does not annotate, e.g.
    neck and head top on COCO-like images) — what PoseBH's cross-type self-supervision targets.

Mean ± standard deviation over the seeds (`config.seed`: initialisation, data order and
augmentation; the synthetic data itself is generated once, with `data.synthetic.seed` 0, and
shared by every run). One run of each model takes about 11 minutes on 2 CPU cores.

  python benchmarks/paper_claim.py --seeds=0,1,2 --workdir=/tmp/paper_claim
  python benchmarks/paper_claim.py --seeds=0 --steps=100   # a quick smoke run (not a result)

Finished runs are reused: a seed whose `<workdir>/<model>_seed<s>/eval/metrics_<steps>.json`
exists is not trained again, so the script can be stopped and restarted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


from configs import synthetic
from posebh_jax.train import loop

_MODELS = (("baseline", "baseline"), ("posebh", ""))


def _run(model_arg: str, seed: int, workdir: str, data_root: str, steps: int | None) -> dict:
  config = synthetic.get_config(model_arg or None)
  config.seed = seed
  config.data.root = data_root
  if steps is not None:
    config.train.num_steps = steps
    # Keep the stage change at 2/3 of the run, as the default does (600 of 900).
    if config.model.use_proto_head:
      for name in ("proto_freeze_step", "cps_start_step", "css_start_step"):
        config.schedule[name] = (2 * steps) // 3
    config.train.checkpoint_every = steps
  metrics_file = os.path.join(workdir, "eval", f"metrics_{config.train.num_steps}.json")
  if not os.path.exists(metrics_file):
    loop.train_and_evaluate(config, workdir)
  with open(metrics_file) as f:
    return json.load(f)


def _rows(metrics: dict, thr: str) -> dict[str, float]:
  """Flattens one run's metrics to {row name: value} at threshold `thr` (e.g. "pck@0.1")."""
  out = {}
  for name, m in metrics["per_dataset"].items():
    out[f"{name}"] = m[thr]
  for pair, m in metrics["cross_skeleton"].items():
    out[f"{pair} (all)"] = m[thr]
    if m.get("novel"):
      out[f"{pair} (novel)"] = m["novel"][thr]
  return out


def _fmt(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated config.seed values")
  parser.add_argument("--workdir", default="runs/paper_claim")
  parser.add_argument("--steps", type=int, default=None,
                      help="override train.num_steps for both models (smoke runs only)")
  parser.add_argument("--threshold", default="0.1", help="PCK threshold to report")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",") if s]
  workdir = os.path.abspath(args.workdir)
  data_root = os.path.join(workdir, "synthetic_data")
  thr = f"pck@{float(args.threshold):g}"

  results: dict[str, list[dict[str, float]]] = {m: [] for m, _ in _MODELS}
  t0 = time.time()
  for seed in seeds:
    for name, arg in _MODELS:
      run_dir = os.path.join(workdir, f"{name}_seed{seed}")
      print(f"--- {name}, seed {seed} ({run_dir})", flush=True)
      results[name].append(_rows(_run(arg, seed, run_dir, data_root, args.steps), thr))

  rows = list(results["posebh"][0])
  width = max(len(r) for r in rows) + 2
  print(f"\n{thr.upper()} on held-out synthetic images, seeds {seeds}"
        f"{'' if args.steps is None else f', {args.steps} steps (smoke run)'}; "
        f"{time.time() - t0:.0f} s in all")
  print(f"{'images -> skeleton':<{width}} {'baseline':>15} {'PoseBH':>15} {'PoseBH - base':>14}")
  for row in rows:
    base = [r[row] for r in results["baseline"]]
    ours = [r[row] for r in results["posebh"]]
    diff = [o - b for o, b in zip(ours, base)]
    print(f"{row:<{width}} {_fmt(base):>15} {_fmt(ours):>15} {_fmt(diff):>14}")
  print("\nPer seed (baseline / PoseBH):")
  for i, seed in enumerate(seeds):
    vals = ", ".join(f"{row} {results['baseline'][i][row]:.3f}/{results['posebh'][i][row]:.3f}"
                     for row in rows)
    print(f"  seed {seed}: {vals}")


if __name__ == "__main__":
  main()
