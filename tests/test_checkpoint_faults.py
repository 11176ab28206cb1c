"""Faults a user meets in a training workdir, met through the real `posebh-train` CLI.

  * a learning rate that blows the weights up (loss still finite) → stop, nothing non-finite
    saved, and the named "last good checkpoint" really is finite (issue 15 item 1);
  * damaged checkpoints (bit rot: 64 flipped bytes in a state chunk; a truncated state file; a
    deleted _METADATA; an emptied iterator state) → each skipped with its reason and set aside,
    training resumes from the newest intact one and reproduces the undamaged run bit for bit,
    and train_metrics.jsonl holds each step once (items 2, 3, 5);
  * a config whose model differs from the checkpoint's in fields other than embed_dim → one line
    naming every differing field, nothing touched (item 4).

Each test also checks that no file outside the job's own workdir changed.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import synthetic
from conftest import cli_env, tiny_train_args
from faultcheck import changed, snapshot
from posebh_jax.train import checkpoint as checkpoint_lib
from posebh_jax.train import restore

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 10  # Checkpoints at 2, 4, 6, 8, 10 (all kept).


def _cli(workdir, data_root, *overrides, num_steps=NUM_STEPS):
  args = tiny_train_args(workdir, data_root, "--config.train.eval_at_end=False",
                         "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=5",
                         "--config.train.log_every=1", *overrides, num_steps=num_steps)
  return subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                        timeout=900)


def _metric_lines(workdir) -> list[dict]:
  return [json.loads(line) for line in (Path(workdir) / "train_metrics.jsonl").read_text()
          .splitlines()]


def _config(data_root):
  cfg = synthetic.get_config("tiny")
  cfg.data.root = str(data_root)
  return cfg


def _restore(workdir, data_root, step):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.device_get(restore.restore_state(_config(data_root), workdir, step, mesh)[0])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """An undamaged 10-step run: (pristine workdir, data root, {step: loss})."""
  root = tmp_path_factory.mktemp("ckpt_faults")
  data_root, wd = root / "data", root / "base"
  out = _cli(wd, data_root)
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(os.listdir(wd / "checkpoints")) == ["10", "2", "4", "6", "8"]
  return wd, data_root, {r["step"]: r["loss/total"] for r in _metric_lines(wd)}


def _copy(base, tmp_path, name):
  wd = tmp_path / name
  shutil.copytree(base[0], wd)
  return wd


def _outside(base, wd):
  """Snapshot of everything the job must not touch: the repo, the data, the pristine run."""
  return snapshot(REPO, base[1], base[0], wd.parent, exclude=(wd,))


def test_damaged_checkpoints_fall_back_to_the_newest_intact_one(base, tmp_path):
  wd = _copy(base, tmp_path, "damaged")
  ckpts = wd / "checkpoints"
  # Bit rot in step 10: 64 flipped bytes in the middle of every state data file of 4 KB or more.
  # (Not only the largest: OCDBT keeps small arrays inline in B-tree nodes, and the per-process
  # node file, superseded by the merged tree, can be the largest file without being read.)
  for chunk in (ckpts / "10" / "state" / "ocdbt.process_0" / "d").iterdir():
    raw = bytearray(chunk.read_bytes())
    if len(raw) >= 4096:
      mid = len(raw) // 2
      raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
      chunk.write_bytes(bytes(raw))
  # Step 8: truncated state files (each data file of the state cut to half: a copy or an
  # upload that stopped); step 6: no _METADATA; step 4: an empty iterator state.
  for chunk in (ckpts / "8" / "state" / "ocdbt.process_0" / "d").iterdir():
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
  (ckpts / "6" / "state" / "_METADATA").unlink()
  (iterator_state,) = (ckpts / "4" / "data").glob("*.json")
  iterator_state.write_text("")
  before = _outside(base, wd)

  out = _cli(wd, base[1])
  assert out.returncode == 0, out.stderr[-3000:]
  err = out.stderr
  # Flipped bytes either break a compressed chunk (a read error) or change array values that
  # still decode (the digest: `test_state_digest_..._sees_one_flipped_bit`); both are damage.
  for step in (10, 8, 6, 4):
    assert f"checkpoint step {step} in {ckpts} is damaged, skipped: " in err, err[-3000:]
  assert "resumed from step 2, the newest intact checkpoint; skipped damaged steps 10, 8, 6, 4" \
      in err
  assert "resumed from checkpoint at step 2" in err
  # Damaged checkpoints are kept for inspection, out of orbax's way; training saved them anew.
  assert sorted(os.listdir(wd / "checkpoints_damaged")) == ["10", "4", "6", "8"]
  assert sorted(os.listdir(ckpts), key=int) == ["2", "4", "6", "8", "10"]

  # Item 5: each step logged once; the retrained steps reproduce the undamaged run exactly
  # (so the fallback restored step 2's state and data iterator, not a damaged one).
  lines = _metric_lines(wd)
  assert [r["step"] for r in lines] == list(range(1, NUM_STEPS + 1))
  assert {r["step"]: r["loss/total"] for r in lines} == base[2]
  assert "dropped 8 lines after the restored step 2" in err
  assert changed(before, _outside(base, wd)) == []


def test_huge_learning_rate_never_checkpoints_a_non_finite_state(base, tmp_path):
  wd = _copy(base, tmp_path, "lr")
  before = _outside(base, wd)
  # Resumes at step 10; with lr 1e39 the loss and gradient of step 11 are finite but the
  # updated weights are not.
  out = _cli(wd, base[1], "--config.train.learning_rate=1e39", "--config.train.checkpoint_every=1",
             num_steps=NUM_STEPS + 3)
  assert out.returncode == 1, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("posebh-train: non-finite training state after step 11 (finite loss "
                         "and gradient norm; "), last
  assert "NaN/Inf in the updated params" in last
  assert last.endswith(f"stopped without saving; last good checkpoint: step 10 in "
                       f"{wd / 'checkpoints'}"), last
  ckpt = checkpoint_lib.Checkpointer(str(wd))
  steps = ckpt.all_steps()
  ckpt.close()
  assert max(steps) == 10
  state = _restore(wd, base[1], 10)
  for part in ("params", "opt_state", "batch_stats", "prototypes", "cluster_prototypes"):
    leaves = [x for x in jax.tree_util.tree_leaves(getattr(state, part))
              if np.issubdtype(x.dtype, np.floating)]
    assert all(np.isfinite(x).all() for x in leaves), part
  assert changed(before, _outside(base, wd)) == []


def test_mismatched_model_fields_are_named_and_nothing_is_touched(base, tmp_path):
  wd = _copy(base, tmp_path, "mismatch")
  # Everything of the run is untouched; only JAX's persistent compilation cache
  # (train.compilation_cache, a cache of compiled code) may gain entries.
  cache = (wd / "compilation_cache",)
  before = _outside(base, wd) | snapshot(wd, exclude=cache)
  out = _cli(wd, base[1], "--config.model.mlp_ratio=2", "--config.model.proto.num_in_class=2")
  assert out.returncode == 1
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"posebh-train: checkpoint {wd / 'checkpoints'}/10 was written for "
                         "another model or dataset mix ("), last
  assert "model_config.mlp_ratio: checkpoint 4 vs config 2" in last
  assert "model_config.proto.num_in_class: checkpoint 3 vs config 2" in last
  assert changed(before, _outside(base, wd) | snapshot(wd, exclude=cache)) == []


def test_meta_differences_names_nested_fields_and_skips_unrecorded_ones():
  saved = dict(datasets=["a"], model_config=dict(mlp_ratio=4, proto=dict(num_in_class=3)))
  now = dict(datasets=["a"], model=dict(depth=2),
             model_config=dict(mlp_ratio=4, proto=dict(num_in_class=2, gamma=0.9)))
  assert checkpoint_lib.meta_differences(saved, now) == {
      "model_config.proto.num_in_class": (3, 2)}


def test_state_digest_is_the_same_on_1_and_8_devices_and_sees_one_flipped_bit():
  rng = np.random.RandomState(0)
  x = rng.randn(64, 24).astype(np.float32)
  tree = dict(a=x, b=np.arange(16, dtype=np.int32), h=x[:8].astype(jnp.bfloat16),
              k=jax.random.key(3), m=x[:16] > 0)
  one = checkpoint_lib.state_digest(jax.device_put(tree, jax.devices()[0]))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.tree_util.tree_map(
      lambda v: jax.device_put(v, NamedSharding(mesh, P("data"))), dict(tree, k=None))
  sharded["k"] = tree["k"]
  eight = checkpoint_lib.state_digest(sharded)
  assert one == eight and len(set(one.values())) == 5
  flipped = x.copy()
  flipped.view(np.uint32)[5, 7] ^= 1  # One bit of one float.
  other = checkpoint_lib.state_digest(dict(tree, a=flipped))
  assert [k for k in one if one[k] != other[k]] == ["['a']"]


def test_first_save_on_8_devices_compiles_nothing_for_small_replicated_arrays(tmp_path):
  """orbax's replica-parallel save sliced every replicated array per replica with a jitted slice
  (compiled on a process's first save: 6 s of a 20 s tiny training run on 8 devices). Arrays
  below `REPLICA_PARALLEL_MIN_SLICE_BYTES` per slice are written whole by one replica: the save
  compiles nothing beyond the state digest, and restores the same values."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  rng = np.random.RandomState(1)
  # Distinct shapes, so that no slice program could be shared between leaves.
  state = {f"w{i}": jax.device_put(rng.randn(8 * (i + 1), 5).astype(np.float32), replicated)
           for i in range(12)}
  checkpoint_lib.state_digest(state)  # The digest's own compilations, before counting.
  compiles = []

  def listener(name, secs, **kw):
    if name == "/jax/core/compile/backend_compile_duration":
      compiles.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
    assert ckpt.save(1, state, None, {})
    ckpt.wait()
  finally:
    # Only this test's listener: clearing all would drop listeners JAX or other tests hold.
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == [], f"{len(compiles)} compilations during the save"
  restored = ckpt.restore(1, state, None, {})
  ckpt.close()
  for k, v in state.items():
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(v))
