r"""Full PoseBH train step vs. the multi-head-only (ViTPose++) step, same backbone, one run.

Both steps are the project's jitted train step (`posebh_jax.train.step.make_train_step`) on the
same backbone, heads, batch and optimizer:

  multi-head   ViTPose++: ViTMoE + one heatmap head per dataset, heatmap losses only.
  posebh       + prototype head, prototype heatmaps, Sinkhorn prototype learning and PPCE,
               cluster-prototype supervision (CPS) and cross-type self-supervision (CSS), i.e.
               the second-stage step, the most expensive one (the first stage replaces CPS/CSS
               by the EMA update).

It prints the median step time of each, images/s, their ratio (the project's goal: ≤ 1.10 at
PoseBH-B size), FLOPs per image from XLA's cost analysis of each compiled step, and the model
FLOPs utilisation (MFU) where the device's peak is known (`posebh_jax.train.throughput`). Every
parameter group trains (the most expensive stage). On CPU only the ratio and the FLOPs are
meaningful; absolute times and MFU count only on a GPU/TPU.

With PyTorch installed (the `[torch]` extra) and `--size=b`, it also times a PyTorch port of the
reference's PoseBH-B step (`benchmarks/torch_reference.py`: the authors' modules and losses, the
same batch, layer-decay AdamW with clipping, every parameter trained) beside each of ours, the
steps (ours and the reference's, multi-head and PoseBH) interleaved within one loop so that all
see the same machine load, and prints `ratio reference/ours` (> 1: ours is faster). Without
torch it says so and times ours only. The reference runs in a child process that this run
starts and drives one step at a time (`--reference=inprocess`: in this process): in one
process, at batch 8, the two runtimes slowed ours from 11.5 s to 27-30 s per step, with 90-160 s
of kernel time per run (at batch 2 the effect was 2 %).

  python benchmarks/train_step.py                        # PoseBH-B sizes, batch 2 (CPU: minutes)
  python benchmarks/train_step.py --size=tiny --batch=8  # seconds
  python benchmarks/train_step.py --batch=128 --dtype=bfloat16 --repeats=20  # one accelerator
  python benchmarks/train_step.py --batch=512 --dtype=bfloat16 --fsdp=8      # 8 devices, FSDP
  python benchmarks/train_step.py --batch=8 --steps=posebh    # one pair: ours and the reference's

`--steps` picks which of the two steps to build (default both). At PoseBH-B size and batch 8 a
24 GB machine holds one pair at a time (ours ~8 GB per step at its peak, the reference's
~6 GB): run `--steps=multi-head` and `--steps=posebh`, and `--reference=off` for PoseBH ÷
multi-head.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import resource
import statistics
import time

import jax
import numpy as np

from configs import posebh as posebh_configs
from data_pipelines import datasets, pipeline
from posebh_jax import experiment
from posebh_jax.train import loop, sharding, throughput
from posebh_jax.train import step as step_lib


def _batch(config, layout, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of the six datasets in turn, with Gaussian-bump targets (realistic pixel sets)."""
  rs = np.random.RandomState(seed)
  (h, w), (hh, hw) = config.data.image_size, config.data.heatmap_size
  k_max = layout.max_keypoints
  ds = (np.arange(batch_size) % layout.num_datasets).astype(np.int32)
  yy, xx = np.mgrid[0:hh, 0:hw]
  cx = rs.uniform(0, hw, (batch_size, k_max))[..., None, None]
  cy = rs.uniform(0, hh, (batch_size, k_max))[..., None, None]
  target = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 8.0).astype(np.float32)
  target[target < np.exp(-9.0)] = 0.0  # The generator's 13×13 truncation, roughly.
  mask = layout.skeleton_mask()[ds]
  weight = mask * (rs.rand(batch_size, k_max) > 0.2)
  return dict(image=rs.randn(batch_size, h, w, 3).astype(np.float32),
              target=target * weight[..., None, None].astype(np.float32),
              target_weight=weight.astype(np.float32), dataset_index=ds,
              skeleton_mask=mask)


def _build(config, mesh, stage_step: int | None, **cfg_overrides):
  """→ (layout, train state, jitted step, its ObjectiveConfig) of `stage_step`'s stage
  (None: the first), with `cfg_overrides` replacing ObjectiveConfig fields (stage flags)."""
  layout = datasets.build_layout(config)
  model = experiment.build_model(config, layout)
  state, _, shardings, tx = loop.create_train_state(config, model, layout, mesh)
  cfg = loop.step_config(config, layout)
  if stage_step is not None:
    cfg = loop.stage_config(config, cfg, stage_step)
    if cfg.cps:
      state = loop.cluster_state(config, state, shardings)
  cfg = dataclasses.replace(cfg, **cfg_overrides)
  fn = step_lib.make_train_step(model, tx, cfg, mesh, shardings)
  return layout, state, fn, cfg


def _compile(fn, state, batch):
  """→ (compiled step, XLA FLOPs per device per step)."""
  fn = fn.lower(state, batch).compile()
  flops = throughput.compiled_flops(fn)
  return fn, float("nan") if flops is None else flops


def _temp_bytes(fn) -> int | None:
  """XLA's scratch buffer of a compiled step, in bytes (None where the backend does not say)."""
  try:
    return fn.memory_analysis().temp_size_in_bytes
  except (AttributeError, NotImplementedError):
    return None


def _usage_text(temp_bytes: int | None, faults: float, system_s: float) -> str:
  """One step's memory cost on the host: XLA's scratch size, minor page faults and system CPU."""
  scratch = "n/a" if temp_bytes is None else f"{temp_bytes / 2**20:.0f} MiB"
  return (f"XLA scratch buffer {scratch}; per step {faults:.0f} minor page faults, "
          f"{system_s:.2f} s system CPU")


def _time_interleaved(steps: dict, repeats: int, settle: int = 0,
                      usage: dict | None = None) -> dict[str, float]:
  """Median seconds per step of each no-argument callable in `steps`, interleaved.

  Every callable runs one warm-up step, then each repeat runs every callable once in turn, so
  all medians come from the same machine load (on a shared 2-core machine, load drifts over the
  minutes a PoseBH-B run takes; timing the sides one after the other biased their ratio).
  `settle` untimed steps precede each timed one: the first step after another side's steps
  re-faults the memory that side's steps touched (see `main`'s `--settle`).
  With `usage` (a dict), it also fills `usage[name]` with the medians of this process's minor
  page faults and system CPU seconds per timed step (`getrusage`: meaningful for steps that run
  in this process, i.e. ours, and the reference's with `--reference=inprocess`).
  """
  for fn in steps.values():
    fn()  # Warm-up (allocator, thread pool, first-call dispatch).
  times = {name: [] for name in steps}
  faults = {name: [] for name in steps}
  system = {name: [] for name in steps}
  for _ in range(repeats):
    for name, fn in steps.items():
      for _ in range(settle):
        fn()
      r = resource.getrusage(resource.RUSAGE_SELF)
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
      r2 = resource.getrusage(resource.RUSAGE_SELF)
      faults[name].append(r2.ru_minflt - r.ru_minflt)
      system[name].append(r2.ru_stime - r.ru_stime)
  if usage is not None:
    usage.update({name: (statistics.median(faults[name]), statistics.median(system[name]))
                  for name in steps})
  return {name: statistics.median(ts) for name, ts in times.items()}


def _ours(fn, state, batch):
  """A no-argument callable running our compiled step, threading the (donated) state."""
  box = [state]

  def run():
    box[0], m = fn(box[0], batch)
    jax.block_until_ready(m)
  return run


def _torch_reference(batch: dict[str, np.ndarray], proto: bool):
  """A no-argument callable running one reference (PyTorch) train step on `batch`."""
  import torch  # pylint: disable=g-import-not-at-top
  try:  # `python benchmarks/train_step.py` puts benchmarks/ itself on the path.
    import torch_reference  # pylint: disable=g-import-not-at-top
  except ImportError:
    from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = torch_reference.build(proto=proto)
  step = torch_reference.make_step(model)
  img = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
  target = torch.from_numpy(batch["target"])
  weight = torch.from_numpy(batch["target_weight"])
  ds = torch.from_numpy(batch["dataset_index"].astype(np.int64))
  return lambda: step(img, target, weight, ds)


def _reference_worker(conn, host_batch: dict[str, np.ndarray], names: list[str]) -> None:
  """Child process: builds the reference steps named in `names` and answers its thread count
  when ready, then runs the step each message names and answers when it is done, until it
  receives None. (The parent times each round trip, as it times its own steps.)"""
  import torch  # pylint: disable=g-import-not-at-top
  steps = {n: _torch_reference(host_batch, proto=n == "posebh") for n in names}
  conn.send(torch.get_num_threads())
  while (name := conn.recv()) is not None:
    steps[name]()
    conn.send(True)


class _ReferenceProcess:
  """The reference's steps in a child process, run one at a time on request, so that they can
  be interleaved with ours while the two runtimes share no allocator or thread pools. (In one
  process, at PoseBH-B batch 8, ours slowed from 11.5 s to 27-30 s per step beside the PyTorch
  port, with 90-160 s of kernel time per run; at batch 2 the effect was 2 %.)"""

  def __init__(self, host_batch: dict[str, np.ndarray], names: list[str]):
    ctx = multiprocessing.get_context("spawn")  # No fork of a process that has started JAX.
    self._conn, child = ctx.Pipe()
    self._proc = ctx.Process(target=_reference_worker, args=(child, host_batch, names),
                             daemon=True)
    self._proc.start()
    self.threads = self._conn.recv()  # Also waits until the child has built its steps.

  def step(self, name: str):
    """A no-argument callable running the reference step `name` in the child."""
    def run():
      self._conn.send(name)
      self._conn.recv()
    return run

  def close(self) -> None:
    self._conn.send(None)
    self._proc.join(timeout=60)


def _torch_available() -> str | None:
  """The torch version, or None when it is not installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch.__version__


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="b", choices=("b", "h", "tiny"))
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (params, optimizer state and prototypes stay float32)")
  p.add_argument("--fsdp", type=int, default=1, help="devices per parameter shard group")
  p.add_argument("--reference", default="auto", choices=("auto", "inprocess", "off"),
                 help="auto: also time the PyTorch reference port when torch is installed "
                      "(PoseBH-B, float32 only), in a child process driven step by step; "
                      "inprocess: in this process (the runtimes then interfere at batch 8)")
  p.add_argument("--settle", type=int, default=1,
                 help="untimed steps before each timed one (the first step after the other "
                      "side's is slowed by re-faulting memory; 0: time it)")
  p.add_argument("--steps", default="multi-head,posebh",
                 help="comma-separated: which steps to build and time (multi-head, posebh)")
  a = p.parse_args()
  names = a.steps.split(",")
  if not names or set(names) - {"multi-head", "posebh"}:
    raise SystemExit(f"--steps={a.steps}: choose from multi-head, posebh (comma-separated)")

  def config(**model):
    c = posebh_configs.get_config(a.size)
    c.train.batch_size = a.batch
    c.model.dtype = a.dtype
    c.mesh.fsdp = a.fsdp
    for k, v in model.items():
      c.model[k] = v
    return c

  base = config()
  mesh = sharding.make_mesh(base.mesh)
  if a.batch % mesh.size:
    raise SystemExit(f"--batch={a.batch} must be divisible by the {mesh.size} devices")

  full = config()
  stage2 = max(full.schedule.cps_start_step, full.schedule.css_start_step)
  layout = datasets.build_layout(full)
  host_batch = _batch(full, layout, a.batch)
  batch = pipeline.to_global_batch(host_batch, mesh)
  torch_version = _torch_available() if a.reference != "off" else None
  why_not = None
  if a.reference == "off":
    why_not = "--reference=off"
  elif torch_version is None:
    why_not = "PyTorch is not installed (pip install -e '.[torch]')"
  elif a.size != "b" or a.dtype != "float32":
    why_not = "the PyTorch port is PoseBH-B float32 only (--size=b --dtype=float32)"
  use_ref = why_not is None

  steps, flops, temp, usage = {}, {}, {}, {}
  for name in names:
    if name == "posebh":
      _, state, fn, cfg = _build(full, mesh, stage2)
      assert cfg.cps and cfg.css and cfg.use_proto_head
    else:
      _, state, fn, cfg = _build(config(use_proto_head=False), mesh, None)
      assert not cfg.use_proto_head
    fn, flops[name] = _compile(fn, state, batch)
    temp[name] = _temp_bytes(fn)
    steps[name] = _ours(fn, state, batch)
    del state  # Donated to the first call; the callable holds the live state.
  ref = None
  if use_ref and a.reference == "inprocess":
    import torch  # pylint: disable=g-import-not-at-top
    threads = torch.get_num_threads()
    for name in names:
      steps["ref " + name] = _torch_reference(host_batch, proto=name == "posebh")
  elif use_ref:
    ref = _ReferenceProcess(host_batch, names)
    threads = ref.threads
    for name in names:
      steps["ref " + name] = ref.step(name)
  t = _time_interleaved(steps, a.repeats, a.settle, usage)
  if ref is not None:
    ref.close()

  m = full.model
  print(f"device: {jax.devices()[0].device_kind} x{mesh.size} (mesh {dict(mesh.shape)}); size "
        f"{a.size} (ViT {m.embed_dim}-d, depth {m.depth}), {a.dtype} compute, input "
        f"{tuple(full.data.image_size)}, global batch {a.batch}, {a.repeats} timed steps each "
        f"(median; {a.settle} untimed before each)")
  per_device_batch = a.batch / mesh.size  # XLA's FLOPs are per device.

  def row(name, t, flops):
    u = throughput.mfu(flops, t)
    mfu = f"MFU {100 * u:5.1f} %" if u is not None else "MFU n/a (peak unknown)"
    print(f"{name:36s}{t * 1e3:10.1f} ms  {a.batch / t:9.1f} img/s  "
          f"{flops / per_device_batch / 1e9:8.2f} GFLOP/image  {mfu}")
  labels = {"multi-head": "multi-head step (ViTPose++):",
            "posebh": "PoseBH step (proto + CPS + CSS):"}
  for name in names:
    row(labels[name], t[name], flops[name])
  # On CPU, XLA allocates its scratch buffer for each execution and frees it after; at these
  # sizes that is a fresh anonymous mapping each step (strace: one mmap and one munmap of its
  # size per step), so every step faults all of it in again: kernel time outside the step's
  # kernels. Printed so that a CPU user can see it (README, Benchmarks).
  for name in names:
    print(f"  {name}: {_usage_text(temp[name], *usage[name])} (this process)")
  if len(names) == 2:
    print(f"overhead ratio (time):  {t['posebh'] / t['multi-head']:.3f}   (goal <= 1.10)")
    print(f"overhead ratio (FLOPs): {flops['posebh'] / flops['multi-head']:.3f}")
  else:
    print("overhead ratio: not timed (one step built; --steps=multi-head,posebh for it)")
  if not use_ref:
    print(f"reference (PyTorch port): not timed: {why_not}")
    return
  where = "this process" if ref is None else "a child process"
  print(f"reference (PyTorch {torch_version} port, {threads} threads, in {where}), same batch, "
        f"all {len(steps)} steps interleaved:")
  for name, label in (("multi-head", "multi-head:"), ("posebh", "PoseBH:    ")):
    if name in names:
      r = t["ref " + name]
      print(f"  {label} reference {r * 1e3:10.1f} ms  ours {t[name] * 1e3:10.1f} ms  "
            f"ratio reference/ours {r / t[name]:.3f}")
  if len(names) == 2:
    print(f"  reference PoseBH / multi-head: {t['ref posebh'] / t['ref multi-head']:.3f}")


if __name__ == "__main__":
  main()
