"""posebh-convert and the converted-weights format: golden parity after a save/load round trip,
ViTPose++ inputs, clean refusals, full-size layouts, and posebh-eval --weights loading."""

from __future__ import annotations

import collections
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_golden, shared_path
from configs import posebh as posebh_configs
from data_pipelines import datasets
from posebh_jax import experiment
from posebh_jax.convert import weights as weights_lib
from posebh_jax.convert.pth_reader import load_pth
from posebh_jax.convert.torch_to_flax import check_state_dict_shapes, convert_state_dict
from posebh_jax.convert.from_pth import ConversionError, convert_checkpoint, extract_state_dict
from posebh_jax.models import tiny_reference_model
from posebh_jax.objective.prototypes import prototype_heatmap

CONFIG_FILE = REPO / "configs" / "posebh.py"


@pytest.fixture(scope="module")
def tiny_pth() -> Path:
  return shared_path("golden/tiny_posebh.pth")


@pytest.fixture(scope="module")
def tiny_state_dict(tiny_pth):
  return load_pth(tiny_pth)["state_dict"]


@pytest.fixture(scope="module")
def tiny_config():
  return posebh_configs.get_config("tiny_reference")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  return subprocess.run([sys.executable, "-m", "posebh_jax.main_convert", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


# --- A torch.save zip writer (pickle protocol 2 opcodes), so no test needs torch. ---------------

_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def _pickle(value, storages: dict[str, bytes]) -> bytes:
  if isinstance(value, str):
    b = value.encode()
    return b"X" + struct.pack("<I", len(b)) + b
  if isinstance(value, bool):
    return b"\x88" if value else b"\x89"
  if isinstance(value, int):
    return b"J" + struct.pack("<i", value)
  if isinstance(value, tuple):
    return b"(" + b"".join(_pickle(v, storages) for v in value) + b"t"
  if isinstance(value, dict):
    head = b"ccollections\nOrderedDict\n)R" if isinstance(value, collections.OrderedDict) else b"}"
    items = b"".join(_pickle(k, storages) + _pickle(v, storages) for k, v in value.items())
    return head + (b"(" + items + b"u" if value else b"")
  if isinstance(value, np.ndarray):
    key = str(len(storages))
    storages[key] = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
    storage = (b"(" + _pickle("storage", storages) + b"ctorch\n" + _STORAGE[value.dtype].encode()
               + b"\n" + _pickle(key, storages) + _pickle("cpu", storages)
               + _pickle(int(value.size), storages) + b"tQ")
    strides = tuple(int(np.prod(value.shape[i + 1:])) for i in range(value.ndim))
    args = (b"(" + storage + _pickle(0, storages) + _pickle(tuple(value.shape), storages)
            + _pickle(strides, storages) + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"t")
    return b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"
  raise TypeError(type(value))


def write_pth(path: Path, obj) -> Path:
  """Writes `obj` (dicts, str/int, numpy float32/int64 tensors) the way torch.save does."""
  storages: dict[str, bytes] = {}
  pkl = b"\x80\x02" + _pickle(obj, storages) + b"."
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", "little")
    for key, raw in storages.items():
      z.writestr(f"archive/data/{key}", raw)
  return path


def test_pth_writer_round_trips(tmp_path):
  sd = collections.OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3),
                               n=np.array(5, np.int64))
  got = load_pth(write_pth(tmp_path / "x.pth", {"meta": {"epoch": 3}, "state_dict": sd}))
  assert got["meta"] == {"epoch": 3}
  np.testing.assert_array_equal(got["state_dict"]["a"], sd["a"])
  assert got["state_dict"]["n"].dtype == np.int64 and int(got["state_dict"]["n"]) == 5


# --- Converting the golden tiny checkpoint -----------------------------------------------------

@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory, tiny_config, tiny_pth):
  out = tmp_path_factory.mktemp("convert") / "tiny_weights"
  summary = convert_checkpoint(tiny_config, str(tiny_pth), str(out))
  return out, summary


def test_summary_of_tiny_conversion(converted_dir):
  out, summary = converted_dir
  assert summary["kind"] == "posebh"
  assert summary["num_tensors_converted"] == 180 - 18  # All but num_batches_tracked.
  assert summary["num_params"] == 885_510
  assert summary["extras"] == dict(prototypes=[214, 3, 16], cluster_prototypes=[96, 3, 16],
                                   cluster_keypoint=None)
  assert summary["ignored"] == ["optimizer state"]
  assert weights_lib.PLACEHOLDER_NOTE in summary["notes"]
  meta = weights_lib.read_meta(out)
  assert meta["contents"] == dict(params=True, batch_stats=True, prototypes=True,
                                  cluster_prototypes=True, cluster_keypoint=False)
  assert meta["source"]["kind"] == "posebh" and meta["source"]["pth_meta"]["epoch"] == 100
  assert meta["num_keypoints"] == [17, 14, 16, 17, 17, 133]
  assert meta["model_config"]["embed_dim"] == 96
  assert meta["num_clusters"] == 96


@pytest.fixture(scope="module")
def loaded(converted_dir):
  out, _ = converted_dir
  return weights_lib.load_weights(out, tiny_reference_model(), num_prototype_keypoints=214)


def test_loaded_extras_equal_the_pth(loaded, tiny_state_dict):
  weights, meta = loaded
  np.testing.assert_array_equal(weights.prototypes,
                                tiny_state_dict["proto_head.kpt_prototype.prototypes"])
  np.testing.assert_array_equal(weights.cluster_prototypes,
                                tiny_state_dict["proto_head.cluster_prototype.prototypes"])
  assert weights.cluster_prototypes.shape == (96, 3, 16)
  assert weights.cluster_keypoint is None  # The tiny checkpoint is un-clustered.
  assert weights.prototypes.dtype == jnp.float32


def test_loaded_weights_reproduce_golden_outputs(loaded):
  weights, _ = loaded
  io = load_golden("tiny_posebh_io.npz")
  model = tiny_reference_model()
  out = model.apply({"params": weights.params, "batch_stats": weights.batch_stats},
                    jnp.asarray(io["img"].transpose(0, 2, 3, 1)),  # NCHW -> NHWC.
                    jnp.asarray(io["dataset_idx"], jnp.int32), train=False)
  errors = {"backbone_feat": _rel_err(np.asarray(out.features).transpose(0, 3, 1, 2),
                                      io["backbone_feat"]),
            "proto_embedding": _rel_err(np.asarray(out.embedding).transpose(0, 3, 1, 2),
                                        io["proto_embedding"]),
            "proto_heatmap_all": _rel_err(prototype_heatmap(out.embedding, weights.prototypes),
                                          io["proto_heatmap_all"])}
  for d in range(6):
    errors[f"heatmap_head{d}"] = _rel_err(out.heatmaps[d], io[f"heatmap_head{d}"])
  assert max(errors.values()) <= 1e-4, errors


def test_cli_converts_like_the_function(tmp_path, tiny_pth, loaded):
  out = tmp_path / "cli_weights"
  res = _run_cli(f"--config={CONFIG_FILE}:tiny_reference", f"--pth={tiny_pth}", f"--out={out}")
  assert res.returncode == 0, res.stderr
  assert "tensors converted: 162" in res.stdout
  assert "prototypes [214, 3, 16], cluster_prototypes [96, 3, 16]" in res.stdout
  assert "ignored: optimizer state" in res.stdout
  assert weights_lib.PLACEHOLDER_NOTE in res.stdout
  cli_weights, _ = weights_lib.load_weights(out, tiny_reference_model(),
                                            num_prototype_keypoints=214)
  jax.tree_util.tree_map(np.testing.assert_array_equal, cli_weights, loaded[0])

  # The CLI refuses an existing --out and leaves it as it was.
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
  res = _run_cli(f"--config={CONFIG_FILE}:tiny_reference", f"--pth={tiny_pth}", f"--out={out}")
  assert res.returncode != 0
  assert "posebh-convert:" in res.stderr and "already exists" in res.stderr
  assert "Traceback" not in res.stderr
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_cli_wrong_model_names_misshaped_keys(tmp_path, tiny_pth):
  out = tmp_path / "w"
  res = _run_cli(f"--config={CONFIG_FILE}:tiny", f"--pth={tiny_pth}", f"--out={out}")
  assert res.returncode != 0
  assert "Traceback" not in res.stderr
  assert "posebh-convert:" in res.stderr
  assert "mis-shaped keys" in res.stderr
  assert "backbone.pos_embed: (1, 193, 96)" in res.stderr
  assert not out.exists()


def test_cli_missing_pth(tmp_path):
  res = _run_cli(f"--config={CONFIG_FILE}:tiny_reference", f"--pth={tmp_path}/nope.pth",
                 f"--out={tmp_path}/w")
  assert res.returncode != 0
  assert "Traceback" not in res.stderr
  assert f"posebh-convert: {tmp_path}/nope.pth: no such checkpoint file" in res.stderr


# --- Other inputs ------------------------------------------------------------------------------

def test_vitpose_checkpoint_converts_without_prototypes(tmp_path, tiny_config, tiny_state_dict):
  """ViTPose++ weights (no proto_head.*, DDP 'module.' prefix, bare state dict) for PoseBH."""
  sd = collections.OrderedDict((f"module.{k}", v) for k, v in tiny_state_dict.items()
                               if not k.startswith("proto_head."))
  pth = write_pth(tmp_path / "vitpose.pth", sd)
  summary = convert_checkpoint(tiny_config, str(pth), str(tmp_path / "w"))
  assert summary["kind"] == "vitpose++"
  assert summary["extras"] == dict(prototypes=None, cluster_prototypes=None,
                                   cluster_keypoint=None)
  assert summary["initialised"] == ["proto_head (model init, seed 0)"]
  assert summary["ignored"] == []
  weights, meta = weights_lib.load_weights(tmp_path / "w", tiny_reference_model(),
                                           num_prototype_keypoints=214)
  assert weights.prototypes is None and weights.cluster_prototypes is None
  assert meta["contents"]["prototypes"] is False
  np.testing.assert_array_equal(weights.params["backbone"]["pos_embed"],
                                tiny_state_dict["backbone.pos_embed"])
  # The prototype head is a real initialisation (not zeros), from the config's seed.
  head = np.asarray(weights.params["proto_head"]["head_0"]["kernel"])
  assert np.isfinite(head).all() and head.std() > 0


def test_posebh_checkpoint_for_a_vitpose_config(tmp_path, tiny_pth):
  config = posebh_configs.get_config("tiny_reference")
  config.model.use_proto_head = False
  summary = convert_checkpoint(config, str(tiny_pth), str(tmp_path / "w"))
  assert summary["ignored"] == ["43 proto_head.* tensors (the config has no prototype head)",
                                "optimizer state"]
  assert summary["extras"]["prototypes"] is None
  weights, _ = weights_lib.load_weights(tmp_path / "w", tiny_reference_model(use_proto_head=False),
                                        num_prototype_keypoints=214)
  assert "proto_head" not in weights.params


@pytest.mark.parametrize("wrap", ["model", "module", "bare"])
def test_extract_state_dict_layouts(wrap):
  sd = {"module.a": np.zeros(2, np.float32), "module.b": np.ones(1, np.float32)}
  ckpt = sd if wrap == "bare" else {wrap: sd, "meta": {}}
  got, where = extract_state_dict(ckpt)
  assert sorted(got) == ["a", "b"]
  assert where == (None if wrap == "bare" else wrap)


def test_forbidden_pickle_is_refused(tmp_path, tiny_config):
  pth = tmp_path / "evil.pth"
  with zipfile.ZipFile(pth, "w") as z:
    z.writestr("archive/data.pkl", b"\x80\x02cos\nsystem\n(X\x04\x00\x00\x00echot" + b"R.")
  with pytest.raises(ConversionError, match=r"evil\.pth.*forbidden global 'os\.system'"):
    convert_checkpoint(tiny_config, str(pth), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_non_zip_and_missing_files(tmp_path, tiny_config):
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(ConversionError, match="not a zip"):
    convert_checkpoint(tiny_config, str(legacy), str(tmp_path / "w"))
  with pytest.raises(FileNotFoundError, match="missing.pth"):
    convert_checkpoint(tiny_config, str(tmp_path / "missing.pth"), str(tmp_path / "w"))
  with pytest.raises(ConversionError, match="no state dict of tensors"):
    convert_checkpoint(tiny_config, str(write_pth(tmp_path / "m.pth", {"meta": {"epoch": 1}})),
                       str(tmp_path / "w"))


def test_overwrite_replaces_existing_weights(tmp_path, tiny_config, tiny_pth, tiny_state_dict):
  out = tmp_path / "w"
  out.mkdir()
  (out / "keep.txt").write_text("old")
  with pytest.raises(FileExistsError, match="already exists"):
    convert_checkpoint(tiny_config, str(tiny_pth), str(out))
  assert (out / "keep.txt").read_text() == "old"
  out.joinpath("keep.txt").unlink()
  out.rmdir()
  convert_checkpoint(tiny_config, str(tiny_pth), str(out))
  convert_checkpoint(tiny_config, str(tiny_pth), str(out), overwrite=True)
  assert [p.name for p in tmp_path.iterdir()] == ["w"]  # No temporary siblings left behind.
  weights, _ = weights_lib.load_weights(out, tiny_reference_model(), num_prototype_keypoints=214)
  np.testing.assert_array_equal(weights.prototypes,
                                tiny_state_dict["proto_head.kpt_prototype.prototypes"])


def _tree(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


def _workdir_like(root: Path) -> Path:
  """What a training workdir holds: checkpoints, events, metrics, and a user's own file."""
  wd = root / "workdir"
  (wd / "checkpoints" / "2" / "state").mkdir(parents=True)
  (wd / "checkpoints" / "2" / "state" / "_METADATA").write_text("{}")
  (wd / "tensorboard").mkdir()
  (wd / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"\x00" * 32)
  (wd / "train_metrics.jsonl").write_text('{"step": 1}\n')
  (wd / "notes.txt").write_text("mine")
  return wd


@pytest.mark.parametrize("case", ["training_workdir", "dot", "unrelated_file",
                                  "weights_plus_unrelated_file"])
def test_overwrite_refuses_anything_but_converted_weights(tmp_path, tiny_pth, case):
  """`posebh-convert --overwrite` deletes nothing that is not itself converted weights."""
  root = tmp_path / "user"
  root.mkdir()
  cwd = REPO
  if case == "training_workdir":
    out = str(_workdir_like(root))
  elif case == "dot":  # `--out=.` run inside a project checkout (here: a stand-in one).
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "README.md").write_text("# project\n")
    cwd, out = root, "."
  elif case == "unrelated_file":
    (root / "other").mkdir()
    (root / "other" / "thesis.tex").write_text("\\documentclass{article}")
    out = str(root / "other")
  else:
    r = _run_cli(f"--config={CONFIG_FILE}:tiny_reference", f"--pth={tiny_pth}",
                 f"--out={root / 'w'}")
    assert r.returncode == 0, r.stderr[-2000:]
    (root / "w" / "README.txt").write_text("which run these came from")
    out = str(root / "w")
  before = _tree(root)
  env = dict(os.environ, PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, "-m", "posebh_jax.main_convert",
                      f"--config={CONFIG_FILE}:tiny_reference", f"--pth={tiny_pth}",
                      f"--out={out}", "--overwrite"], cwd=cwd, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 1
  last = r.stderr.strip().splitlines()[-1]
  target = os.path.abspath(os.path.join(cwd, out))
  if case == "weights_plus_unrelated_file":
    assert last == (f"posebh-convert: {target} holds converted weights and files posebh-convert "
                    "did not write (README.txt): not replaced; nothing was deleted")
  else:
    assert last.startswith(f"posebh-convert: {target} exists and is not converted weights "), last
    assert last.endswith("--overwrite only replaces a directory written by posebh-convert; "
                         "nothing was deleted")
  assert _tree(root) == before  # Not one file changed, added or removed.
  assert sorted(p.name for p in root.parent.iterdir()) == ["user"]  # No temporary siblings.


# --- The converted-weights format ----------------------------------------------------------------

def test_load_weights_names_mismatching_leaves(converted_dir):
  out, _ = converted_dir
  model = tiny_reference_model(head_deconv_filters=(16, 16))
  with pytest.raises(weights_lib.WeightsMismatchError) as info:
    weights_lib.load_weights(out, model, num_prototype_keypoints=214)
  msg = str(info.value)
  assert "mis-shaped" in msg
  assert "params/heads_0/deconv_layers_0/kernel: stored (4, 4, 32, 96), model expects " \
         "(4, 4, 16, 96)" in msg
  with pytest.raises(weights_lib.WeightsMismatchError, match=r"prototypes: stored \(214, 3, 16\)"):
    weights_lib.load_weights(out, tiny_reference_model(), num_prototype_keypoints=200)
  with pytest.raises(weights_lib.WeightsMismatchError, match="not in the model"):
    weights_lib.load_weights(out, tiny_reference_model(use_proto_head=False),
                             num_prototype_keypoints=214)


def test_load_weights_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
    weights_lib.load_weights(tmp_path / "absent", tiny_reference_model(),
                             num_prototype_keypoints=214)


def test_interrupted_save_leaves_nothing_loadable(tmp_path):
  """A save that dies mid-write leaves no directory under the final name."""
  weights = weights_lib.PretrainedWeights(params={"a": np.ones(3, np.float32)}, batch_stats={})
  with pytest.raises(TypeError):
    weights_lib.save_weights(tmp_path / "w", weights, {"bad": object()})  # Not JSON.
  assert not (tmp_path / "w").exists()
  with pytest.raises(FileNotFoundError):
    weights_lib.load_weights(tmp_path / "w", tiny_reference_model(), num_prototype_keypoints=214)


def test_cluster_keypoint_recovered_from_clustered_prototypes(tmp_path):
  rng = np.random.default_rng(0)
  protos = rng.normal(size=(214, 3, 16)).astype(np.float32)
  protos /= np.linalg.norm(protos, axis=-1, keepdims=True)
  flat = protos.reshape(-1, 16)
  top = rng.choice(642, size=(96, 3), replace=False)  # Flat prototype ids per cluster.
  # A "clustered" checkpoint: the converter recovers and stores the cluster -> keypoint link.
  sd = collections.OrderedDict(load_pth(shared_path("golden/tiny_posebh.pth"))["state_dict"])
  sd["proto_head.kpt_prototype.prototypes"] = protos
  sd["proto_head.cluster_prototype.prototypes"] = flat[top[:64]]
  pth = write_pth(tmp_path / "clustered.pth", {"state_dict": sd})
  summary = convert_checkpoint(posebh_configs.get_config("tiny_reference"), str(pth),
                               str(tmp_path / "w"))
  assert summary["extras"]["cluster_keypoint"] == [64]
  assert any("64 cluster prototypes" in n for n in summary["notes"])  # Config says 96.
  weights, meta = weights_lib.load_weights(tmp_path / "w", tiny_reference_model(),
                                           num_prototype_keypoints=214)
  np.testing.assert_array_equal(weights.cluster_keypoint, top[:64, 0] // 3)
  assert weights.cluster_keypoint.dtype == jnp.int32 and meta["num_clusters"] == 64


# --- Full-size layouts ---------------------------------------------------------------------------

@pytest.mark.parametrize("manifest,arg", [("manifest_vitb_posebh.json", "b"),
                                          ("manifest_vith_posebh.json", "h")])
def test_full_size_manifests_map_onto_configs(manifest, arg):
  shapes = {e["key"]: e["shape"]
            for e in json.loads(shared_path(f"golden/{manifest}").read_text())["state_dict"]}
  config = posebh_configs.get_config(arg)
  layout = datasets.build_layout(config)
  check_state_dict_shapes(shapes, experiment.build_model(config, layout))
  if arg == "b":  # The ViTPose++ config takes the same layout minus the prototype head.
    vitpose = posebh_configs.get_config("vitpose_b")
    check_state_dict_shapes({k: s for k, s in shapes.items() if not k.startswith("proto_head.")},
                            experiment.build_model(vitpose, datasets.build_layout(vitpose)))


# --- posebh-eval --weights -----------------------------------------------------------------------

def test_eval_weights_restores_converted_params(converted_dir, tiny_config, tiny_state_dict):
  from posebh_jax.evaluation import evaluate
  from posebh_jax.train import sharding as sharding_lib

  out, _ = converted_dir
  layout = datasets.build_layout(tiny_config)
  model = experiment.build_model(tiny_config, layout)
  mesh = sharding_lib.make_mesh(tiny_config.mesh)
  weights = evaluate.load_eval_weights(tiny_config, str(out), model, layout, mesh)
  params, batch_stats, _ = convert_state_dict(tiny_state_dict, model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, dict(weights.params), params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, dict(weights.batch_stats), batch_stats)
  leaf = jax.tree_util.tree_leaves(weights.params)[0]
  assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == mesh.size
