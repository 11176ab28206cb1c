r"""What each part of the PoseBH step costs over the multi-head step, PoseBH-B, one run.

`benchmarks/train_step.py` gives PoseBH ÷ multi-head; this splits the difference. It compiles
the project's train step (`posebh_jax.train.step.make_train_step`) for up to six variants of
the same model, batch and optimizer, and times them interleaved (`train_step._time_interleaved`,
so all see the same machine load):

  multi      ViTPose++: no prototype head, heatmap losses only.
  protohead  + the prototype head, its embedding only touched by a 1e-9·sum (its forward and
             backward run, no prototype objective).
  nocps      + the prototype objective of stage 2 (similarities, Sinkhorn targets, PPCE, the
             prototype heatmaps), CPS and CSS off.
  cps        + cluster-prototype supervision.
  css        nocps + cross-type self-supervision.
  full       the stage-2 step (CPS and CSS): what train_step.py calls "PoseBH".
  scatter    full, with the MoE experts' gradient as plain indexing's scatter-add (before
             `vit_moe.take_experts`): `--variants=scatter,full`.

  python benchmarks/step_parts.py --batch=2
  python benchmarks/step_parts.py --batch=8 --variants=multi,protohead,full

Each PoseBH-B variant holds its own train state (~2.5 GB at batch 8 on CPU): on a 24 GB machine
time at most three at batch 8, or swapping distorts the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

import train_step as ts  # benchmarks/ is the script's directory, hence on the path.
from configs import posebh as posebh_configs
from data_pipelines import pipeline
from posebh_jax.models import vit_moe
from posebh_jax.train import sharding
from posebh_jax.train import step as step_lib

_OBJECTIVE = step_lib.posebh_objective
_TAKE_EXPERTS = vit_moe.take_experts


def _head_only(outputs, batch, weight, protos, rng, cfg):
  """The multi-head objective, plus a negligible term that keeps the prototype head alive."""
  total, metrics, prototypes = _OBJECTIVE(outputs, batch, weight, protos, rng,
                                          dataclasses.replace(cfg, use_proto_head=False))
  return total + 1e-9 * jnp.sum(outputs.embedding.astype(jnp.float32)), metrics, prototypes


def _plain_take(table, index):
  """Each sample's expert rows by plain indexing: its gradient is a scatter-add."""
  return table[index]


def _step(size: str, batch_size: int, *, proto_head: bool, objective=None, take=None,
          **stage_overrides):
  """→ (a no-argument callable running one compiled stage-2 step of the variant, XLA's
  scratch bytes of that step or None)."""
  c = posebh_configs.get_config(size)
  c.train.batch_size = batch_size
  c.model.use_proto_head = proto_head
  mesh = sharding.make_mesh(c.mesh)
  stage2 = max(c.schedule.cps_start_step, c.schedule.css_start_step) if proto_head else None
  # The step looks the objective up when it is traced: swap it for this compilation only.
  step_lib.posebh_objective = objective or _OBJECTIVE
  vit_moe.take_experts = take or _TAKE_EXPERTS  # Likewise the MoE gather (looked up at trace).
  try:
    layout, state, fn, _ = ts._build(c, mesh, stage2, **stage_overrides)
    batch = pipeline.to_global_batch(ts._batch(c, layout, batch_size), mesh)
    fn, _ = ts._compile(fn, state, batch)
  finally:
    step_lib.posebh_objective = _OBJECTIVE
    vit_moe.take_experts = _TAKE_EXPERTS
  return ts._ours(fn, state, batch), ts._temp_bytes(fn)


_VARIANTS = {
    "multi": dict(proto_head=False),
    "protohead": dict(proto_head=True, objective=_head_only),
    "nocps": dict(proto_head=True, cps=False, css=False),
    "cps": dict(proto_head=True, css=False),
    "css": dict(proto_head=True, cps=False),
    "full": dict(proto_head=True),
    "scatter": dict(proto_head=True, take=_plain_take),
}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="b", choices=("b", "h", "tiny"))
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--settle", type=int, default=1,
                 help="untimed steps before each timed one (a step that follows another "
                      "variant's re-faults memory on this kind of machine; 0: time it)")
  p.add_argument("--variants", default="multi,protohead,nocps,cps,full",
                 help=f"comma-separated, from {','.join(_VARIANTS)}; the first is the baseline")
  a = p.parse_args()
  names = a.variants.split(",")
  unknown = sorted(set(names) - set(_VARIANTS))
  if unknown:
    raise SystemExit(f"unknown variants {unknown}; choose from {sorted(_VARIANTS)}")
  built = {n: _step(a.size, a.batch, **_VARIANTS[n]) for n in names}
  usage = {}
  t = ts._time_interleaved({n: run for n, (run, _) in built.items()}, a.repeats, a.settle, usage)
  print(f"device: {jax.devices()[0].device_kind}; size {a.size}, batch {a.batch}, "
        f"{a.repeats} interleaved repeats (median; {a.settle} untimed before each)")
  for n in names:
    print(f"{n:10s} {t[n] * 1e3:10.1f} ms   ÷ {names[0]} {t[n] / t[names[0]]:.3f}   "
          f"{ts._usage_text(built[n][1], *usage[n])}")


if __name__ == "__main__":
  main()
