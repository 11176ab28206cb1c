"""Safe .pth reading, state_dict conversion, and parity with the authors' PyTorch outputs."""

from __future__ import annotations

import json
import struct
import tracemalloc
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_golden, shared_path
from configs import posebh as posebh_configs
from data_pipelines import datasets
from posebh_jax import experiment
from posebh_jax.convert.pth_reader import load_pth
from posebh_jax.convert.torch_to_flax import (check_state_dict_shapes, convert_state_dict,
                                              expected_variables)
from posebh_jax.models import ViTMoEConfig, tiny_reference_model

@pytest.fixture(scope="module")
def golden() -> Path:
  return shared_path("golden")


@pytest.fixture(scope="module")
def checkpoint(golden):
  return load_pth(golden / "tiny_posebh.pth")


@pytest.fixture(scope="module")
def converted(checkpoint):
  model = tiny_reference_model()
  params, batch_stats, extras = convert_state_dict(checkpoint["state_dict"], model)
  return model, params, batch_stats, extras


@pytest.fixture(scope="module")
def golden_io():
  return load_golden("tiny_posebh_io.npz")


# --- Hand-built pickles (protocol 2 opcodes), as torch.save would write them. ---------------------

def _int(n: int) -> bytes:
  return b"J" + struct.pack("<i", n)


def _str(s: str) -> bytes:
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _tuple(*items: bytes) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _tensor_body(key: str, numel: int, offset: int, size: tuple[int, ...],
                 stride: tuple[int, ...]) -> bytes:
  storage = _tuple(_str("storage"), b"ctorch\nFloatStorage\n", _str(key), _str("cpu"),
                   _int(numel)) + b"Q"
  args = _tuple(storage, _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)),
                b"\x89", b"ccollections\nOrderedDict\n)R")
  return b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"


def _tensor_pickle(key: str, numel: int, offset: int, size: tuple[int, ...],
                   stride: tuple[int, ...]) -> bytes:
  return b"\x80\x02}" + _str("t") + _tensor_body(key, numel, offset, size, stride) + b"s."


def _write_pth(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None,
               byteorder: str = "little") -> Path:
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", byteorder)
    for key, raw in (storages or {}).items():
      z.writestr(f"archive/data/{key}", raw)
  return path


# --- pth_reader --------------------------------------------------------------------------------

def test_load_pth_tiny_checkpoint(checkpoint):
  assert set(checkpoint) == {"meta", "state_dict", "optimizer"}
  assert checkpoint["meta"]["epoch"] == 100
  assert checkpoint["meta"]["mmcv_version"] == "1.3.9"
  sd = checkpoint["state_dict"]
  assert len(sd) == 180
  assert list(sd)[0] == "backbone.pos_embed"
  assert sd["backbone.pos_embed"].shape == (1, 193, 96)
  assert sd["backbone.pos_embed"].dtype == np.float32
  assert sd["keypoint_head.deconv_layers.0.weight"].shape == (96, 32, 4, 4)
  nbt = sd["keypoint_head.deconv_layers.1.num_batches_tracked"]
  assert nbt.dtype == np.int64 and nbt.shape == () and 1 <= int(nbt) < 1000
  assert sd["proto_head.kpt_prototype.prototypes"].shape == (214, 3, 16)
  np.testing.assert_allclose(
      np.linalg.norm(sd["proto_head.kpt_prototype.prototypes"], axis=-1), 1.0, atol=1e-5)
  opt = checkpoint["optimizer"]
  assert opt["state"] == {}
  assert opt["param_groups"][0]["lr"] == 1e-3
  assert tuple(opt["param_groups"][0]["betas"]) == (0.9, 0.999)
  assert len(opt["param_groups"][0]["params"]) == 124


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_load_pth_strided_view(tmp_path, byteorder):
  data = np.arange(24, dtype=np.float32)
  raw = data.astype("<f4" if byteorder == "little" else ">f4").tobytes()
  path = _write_pth(tmp_path / "t.pth", _tensor_pickle("0", 24, 2, (3, 4), (1, 3)),
                    {"0": raw}, byteorder)
  t = load_pth(path)["t"]
  want = np.array([[data[2 + i + 3 * j] for j in range(4)] for i in range(3)])
  np.testing.assert_array_equal(t, want)
  assert t.dtype == np.float32 and t.dtype.isnative


def test_load_pth_rejects_out_of_bounds_view(tmp_path):
  raw = np.zeros(8, np.float32).tobytes()
  path = _write_pth(tmp_path / "bad.pth", _tensor_pickle("0", 8, 2, (3, 4), (1, 3)), {"0": raw})
  with pytest.raises(ValueError, match="exceeds its storage"):
    load_pth(path)


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"),
                                         ("builtins", "eval"), ("torch", "load")])
def test_load_pth_refuses_forbidden_globals(tmp_path, module, name):
  pkl = b"\x80\x02c" + f"{module}\n{name}\n".encode() + _tuple(_str("echo pwned")) + b"R."
  path = _write_pth(tmp_path / "evil.pth", pkl)
  with pytest.raises(ValueError, match=rf"evil\.pth.*forbidden global '{module}\.{name}'"):
    load_pth(path)


def test_load_pth_rejects_non_zip(tmp_path):
  path = tmp_path / "legacy.pth"
  path.write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(ValueError, match="not a zip"):
    load_pth(path)


def test_load_pth_negative_offset_names_the_file(tmp_path):
  raw = np.zeros(8, np.float32).tobytes()
  path = _write_pth(tmp_path / "neg.pth", _tensor_pickle("0", 8, -1, (2,), (1,)), {"0": raw})
  with pytest.raises(ValueError, match=r"^.*neg\.pth: tensor \(offset -1"):
    load_pth(path)


def test_load_pth_refuses_stride_zero_views_larger_than_the_file(tmp_path):
  # 8 stored floats viewed as 2**29 (2 GiB) through stride 0: refused before any allocation.
  raw = np.zeros(8, np.float32).tobytes()
  path = _write_pth(tmp_path / "bomb.pth", _tensor_pickle("0", 8, 0, (1 << 29,), (0,)),
                    {"0": raw})
  assert path.stat().st_size < 1024
  tracemalloc.start()
  try:
    with pytest.raises(ValueError, match=r"bomb\.pth: .*536870912 elements, more than its "
                                         r"storage of 8"):
      load_pth(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 16 << 20


def test_load_pth_refuses_many_views_of_one_storage(tmp_path):
  # Ten full views of one 256 KiB storage: 2.5 MiB of tensors from 256 KiB of data.
  n = 1 << 16
  items = b"".join(_str(f"t{i}") + _tensor_body("0", n, 0, (n,), (1,)) for i in range(10))
  pkl = b"\x80\x02}(" + items + b"u."
  path = _write_pth(tmp_path / "views.pth", pkl, {"0": np.zeros(n, np.float32).tobytes()})
  with pytest.raises(ValueError, match=r"views\.pth: its tensors would hold .* \(more than 4 "
                                       r"views of each"):
    load_pth(path)


def test_load_pth_refuses_zip_bomb_before_decompressing(tmp_path):
  # 64 MiB of zeros deflate to ~64 KiB; torch.save never compresses. Nothing is inflated.
  n = 16 << 20
  path = tmp_path / "zipbomb.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", _tensor_pickle("0", n, 0, (n,), (1,)))
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/data/0", bytes(4 * n), compress_type=zipfile.ZIP_DEFLATED)
  assert path.stat().st_size < 1 << 20
  tracemalloc.start()
  try:
    with pytest.raises(ValueError, match=r"zipbomb\.pth: archive entry archive/data/0 expands "
                                         r"from \d+ to 67108864 bytes .*refused unread"):
      load_pth(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 16 << 20


@pytest.mark.parametrize("build", [
    # BUILD with a dict: would set FloatStorage.dtype for every later load.
    b"ctorch\nFloatStorage\n}" + _str("dtype") + _str("x") + b"sb",
    # BUILD with (None, slotstate): setattr(_rebuild_tensor_v2, '__defaults__', ...).
    b"ctorch._utils\n_rebuild_tensor_v2\n(N}" + _str("__defaults__") + b"(J\x01\x00\x00\x00tstb",
])
def test_load_pth_build_cannot_poison_later_loads(tmp_path, build):
  evil = _write_pth(tmp_path / "poison.pth", b"\x80\x02" + build + b".")
  with pytest.raises(ValueError, match=r"poison\.pth: .*(BUILD|cannot set attribute)"):
    load_pth(evil)
  data = np.arange(24, dtype=np.float32)
  good = _write_pth(tmp_path / "good.pth", _tensor_pickle("0", 24, 2, (3, 4), (1, 3)),
                    {"0": data.tobytes()})
  t = load_pth(good)["t"]  # A later, legitimate load in the same process is unaffected.
  assert t.dtype == np.float32 and t.shape == (3, 4) and t[0, 0] == 2.0


# --- Conversion ----------------------------------------------------------------------------------

def test_convert_tiny_tree_matches_model(converted):
  model, params, batch_stats, extras = converted
  expected = expected_variables(model)
  flat = lambda t: {k: v.shape for k, v in _flatten(t).items()}  # noqa: E731
  assert flat(params) == flat(expected["params"])
  assert flat(batch_stats) == flat(expected["batch_stats"])
  assert extras["kpt_prototypes"].shape == (214, 3, 16)
  assert extras["cluster_prototypes"].shape == (96, 3, 16)


def test_convert_transposes(checkpoint, converted):
  _, params, batch_stats, _ = converted
  sd = checkpoint["state_dict"]
  blk = params["backbone"]["blocks_1"]
  np.testing.assert_array_equal(blk["attn"]["qkv"]["kernel"],
                                sd["backbone.blocks.1.attn.qkv.weight"].T)
  np.testing.assert_array_equal(blk["mlp"]["experts_kernel"][4],
                                sd["backbone.blocks.1.mlp.experts.4.weight"].T)
  np.testing.assert_array_equal(blk["mlp"]["experts_bias"][5],
                                sd["backbone.blocks.1.mlp.experts.5.bias"])
  np.testing.assert_array_equal(
      params["heads_3"]["deconv_layers_3"]["kernel"],
      sd["associate_keypoint_heads.2.deconv_layers.3.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(batch_stats["proto_head"]["neck"]["downsample_1"]["var"],
                                sd["proto_head.neck.downsample.1.running_var"])


def test_convert_reports_bad_keys(checkpoint):
  model = tiny_reference_model()
  sd = dict(checkpoint["state_dict"])
  del sd["backbone.blocks.0.mlp.experts.3.weight"]
  del sd["proto_head.neck.bn2.running_mean"]
  sd["backbone.blocks.0.attn.qkv.weight"] = sd["backbone.blocks.0.attn.qkv.weight"][:, :10]
  sd["backbone.blocks.0.mlp.experts.6.bias"] = np.zeros(24, np.float32)
  sd["keypoint_head.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as info:
    convert_state_dict(sd, model)
  msg = str(info.value)
  for needle in ("unknown keys (2)", "keypoint_head.extra.weight",
                 "backbone.blocks.0.mlp.experts.6.bias", "mis-shaped keys (1)",
                 "backbone.blocks.0.attn.qkv.weight: (288, 10), expected (288, 96)",
                 "params/backbone/blocks_0/mlp/experts_kernel[3]",
                 "batch_stats/proto_head/neck/bn2/mean"):
    assert needle in msg, msg


def test_convert_vitpose_style_checkpoint_without_proto_head(checkpoint, converted):
  """ViTPose++ weights have no proto_head.*: allowed missing, filled from an initialised model."""
  model, params, _, _ = converted
  sd = {f"module.{k}": v for k, v in checkpoint["state_dict"].items()
        if not k.startswith("proto_head.")}
  with pytest.raises(ValueError, match="missing variables"):
    convert_state_dict(sd, model)
  base = {"params": {"proto_head": {"head_3": {"bias": np.full(16, 7.0), "kernel": np.zeros(
      (1, 1, 16, 16))}}}}
  p2, _, extras = convert_state_dict(sd, model, allow_missing=("proto_head",),
                                     base_variables=base)
  assert extras == {}
  np.testing.assert_array_equal(p2["backbone"]["pos_embed"], params["backbone"]["pos_embed"])
  np.testing.assert_array_equal(p2["proto_head"]["head_3"]["bias"], 7.0)


def _manifest_shapes(path: Path) -> dict[str, list[int]]:
  manifest = json.loads(path.read_text())
  assert len(manifest["state_dict"]) == manifest["num_entries"]
  return {e["key"]: e["shape"] for e in manifest["state_dict"]}


def _config_model(arg):
  """The model `configs/posebh.py:<arg>` trains (PoseBH-B or -H)."""
  config = posebh_configs.get_config(arg)
  return experiment.build_model(config, datasets.build_layout(config))


@pytest.mark.parametrize("name,arg", [("manifest_vitb_posebh.json", "b"),
                                      ("manifest_vith_posebh.json", "h")])
def test_full_size_manifest_maps_completely(golden, name, arg):
  """Every key of the full-size checkpoint layout lands on a param of matching shape.

  Uses jax.eval_shape only: ViT-H is never materialised.
  """
  shapes = _manifest_shapes(golden / name)
  model = _config_model(arg)
  check_state_dict_shapes(shapes, model)  # Raises listing any unknown / mis-shaped / missing key.
  params = _flatten(expected_variables(model)["params"])
  n_params = sum(int(np.prod(s.shape)) for s in params.values())
  n_torch = sum(int(np.prod(s)) for k, s in shapes.items()
                if not k.endswith(("num_batches_tracked", "running_mean", "running_var"))
                and "prototype" not in k)
  assert n_params == n_torch


def test_config_models_match_spec_sizes():
  assert _config_model("b").backbone == ViTMoEConfig()
  h = _config_model("h").backbone
  assert (h.embed_dim, h.depth, h.num_heads, h.part_features) == (1280, 32, 16, 320)


# --- Parity with the authors' PyTorch outputs ----------------------------------------------------

def _assert_close(got, want, name):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  scale = float(np.abs(want).max())
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@pytest.fixture(scope="module")
def tiny_outputs(converted, golden_io):
  model, params, batch_stats, _ = converted
  images = jnp.asarray(golden_io["img"].transpose(0, 2, 3, 1))  # NCHW -> NHWC.
  return model.apply({"params": params, "batch_stats": batch_stats}, images,
                     jnp.asarray(golden_io["dataset_idx"], jnp.int32), train=False)


def test_parity_backbone(tiny_outputs, golden_io):
  assert list(golden_io["dataset_idx"]) == [0, 5]
  _assert_close(np.asarray(tiny_outputs.features).transpose(0, 3, 1, 2),
                golden_io["backbone_feat"], "backbone_feat")


@pytest.mark.parametrize("head", range(6))
def test_parity_heatmap_heads(tiny_outputs, golden_io, head):
  _assert_close(tiny_outputs.heatmaps[head], golden_io[f"heatmap_head{head}"],
                f"heatmap_head{head}")


def test_parity_proto_embedding(tiny_outputs, golden_io):
  _assert_close(np.asarray(tiny_outputs.embedding).transpose(0, 3, 1, 2),
                golden_io["proto_embedding"], "proto_embedding")


def test_backbone_feat_ds0(converted, golden_io):
  model, params, batch_stats, _ = converted
  images = jnp.asarray(golden_io["img"].transpose(0, 2, 3, 1))
  out = model.apply({"params": params, "batch_stats": batch_stats}, images,
                    jnp.zeros((2,), jnp.int32), train=False)
  _assert_close(np.asarray(out.features).transpose(0, 3, 1, 2),
                golden_io["test_backbone_feat_ds0"], "test_backbone_feat_ds0")


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out
