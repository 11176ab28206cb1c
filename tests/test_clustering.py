"""CPS clustering (spec §3.3, §6.6, §6.9) and cluster targets (spec §2.6.4, §6.7)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import load_golden
from posebh_jax.objective import clustering


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@functools.lru_cache(maxsize=None)
def _golden_run(num_clusters: int, compat_topk: bool, float64: bool):
  """One clustering of the golden input per setting, shared by the tests (each takes seconds)."""
  g = load_golden("cps.npz")
  return clustering.cluster_prototypes(g["proto"], num_clusters, compat_topk=compat_topk,
                                       float64=float64)


@pytest.mark.parametrize("num_clusters", [64, 96])
def test_golden_parity_float64(num_clusters):
  # float64 iterations follow the exact trajectory; the reference's float32 run stays within
  # ~4e-6 of it (measured 3.9e-6 for C=64, 3.6e-6 for C=96), see the module docstring.
  g = load_golden("cps.npz")
  r = _golden_run(num_clusters, True, True)
  np.testing.assert_array_equal(r.closest_keypoint, g[f"closest_kpt_idxs_{num_clusters}"])
  np.testing.assert_allclose(r.assign, g[f"assign_{num_clusters}"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(r.prototypes, g[f"proto_cst_{num_clusters}"], rtol=0, atol=1e-5)
  assert r.closest_keypoint.dtype == jnp.int32
  assert r.assign.dtype == r.prototypes.dtype == r.centres.dtype == jnp.float32
  assert r.centres.shape == (num_clusters, 64)


@pytest.mark.parametrize("num_clusters", [64, 96])
def test_golden_parity_float32(num_clusters):
  # Jittable float32 path: 500 unconverged iterations amplify float32 round-off (measured
  # 3.3e-5 for C=64, 2.4e-6 for C=96); the sorted-distance gaps (>= 1.1e-5) keep indices exact.
  g = load_golden("cps.npz")
  r = _golden_run(num_clusters, True, False)
  np.testing.assert_array_equal(r.closest_keypoint, g[f"closest_kpt_idxs_{num_clusters}"])
  np.testing.assert_allclose(r.assign, g[f"assign_{num_clusters}"], rtol=0, atol=1e-4)
  np.testing.assert_allclose(r.prototypes, g[f"proto_cst_{num_clusters}"], rtol=0, atol=1e-5)


def test_compat_and_intended_differ_on_golden():
  compat = _golden_run(96, True, True)
  intended = _golden_run(96, False, True)
  # As implemented the "nearest" ids are centre ids < C, so keypoints < C/M (spec §6.6).
  assert int(np.max(compat.closest_keypoint)) < 96 // 3
  assert not np.array_equal(compat.closest_keypoint, intended.closest_keypoint)
  assert int(np.max(intended.closest_keypoint)) >= 96 // 3
  # The k-means itself does not depend on the flag.
  np.testing.assert_array_equal(compat.assign, intended.assign)
  np.testing.assert_array_equal(compat.centres, intended.centres)


def test_intended_topk_matches_brute_force():
  rs = np.random.RandomState(3)
  protos = rs.randn(30, 3, 8).astype(np.float32)
  beta, m = 20.0, 3
  r = clustering.cluster_prototypes(protos, 10, iterations=100, beta=beta, float64=True)
  x = _normalize(protos.astype(np.float64)).reshape(-1, 8)
  c = _normalize(np.asarray(r.centres, np.float64))
  dist = (1 - x @ c.T) / 2  # [J*M, C]
  a = np.exp(-beta * (dist - dist.min(1, keepdims=True)))
  np.testing.assert_allclose(r.assign, a / a.sum(1, keepdims=True), atol=1e-6)
  order = np.argsort(dist, axis=0, kind="stable")[:m].T  # [C, M]
  # The check is only meaningful if float32 centres cannot reorder the top M.
  gaps = np.diff(np.sort(dist, axis=0)[:m + 1], axis=0)
  assert gaps.min() > 1e-5
  np.testing.assert_array_equal(r.closest_keypoint, order[:, 0] // m)
  np.testing.assert_allclose(r.prototypes, x[order], atol=1e-6)
  # Every cluster prototype is a keypoint prototype, nearest first.
  np.testing.assert_array_less(dist[order[:, 0], np.arange(10)], dist[order[:, 1], np.arange(10)])


def test_num_clusters_validation():
  protos = np.ones((10, 3, 4), np.float32)
  with pytest.raises(ValueError, match="num_clusters"):
    clustering.cluster_prototypes(protos, 10)
  with pytest.raises(ValueError, match="num_clusters"):
    clustering.cluster_prototypes(protos, 0)
  with pytest.raises(ValueError, match="outside jit"):
    jax.jit(lambda p: clustering.cluster_prototypes(p, 4, float64=True))(protos)


def test_jit_and_8_device_mesh_match_one_device():
  devices = jax.devices()
  assert len(devices) == 8
  mesh = Mesh(np.array(devices), ("data",))
  protos = np.random.RandomState(4).randn(48, 3, 16).astype(np.float32)
  run = jax.jit(functools.partial(clustering.cluster_prototypes, num_clusters=16, iterations=200))
  one = run(jax.device_put(protos, devices[0]))
  eager = clustering.cluster_prototypes(protos, 16, iterations=200)
  for field in ("prototypes", "closest_keypoint", "assign", "centres"):
    np.testing.assert_array_equal(getattr(one, field), getattr(eager, field))
  for spec in (P(), P("data"), P(None, None, "data")):
    sharded = jax.device_put(protos, NamedSharding(mesh, spec))
    got = run(sharded)
    np.testing.assert_array_equal(got.closest_keypoint, one.closest_keypoint)
    # Sharded reductions sum in another order: ulps in the normalised rows, and 200 iterations
    # amplify that round-off in the assignment.
    np.testing.assert_allclose(got.prototypes, one.prototypes, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.assign, one.assign, rtol=0, atol=5e-5)
    np.testing.assert_allclose(got.centres, one.centres, rtol=0, atol=1e-5)
    # The float64 host path gathers first: bitwise independent of the layout.
    f64 = clustering.cluster_prototypes(sharded, 16, iterations=200, float64=True)
    ref64 = clustering.cluster_prototypes(protos, 16, iterations=200, float64=True)
    for field in ("prototypes", "closest_keypoint", "assign", "centres"):
      np.testing.assert_array_equal(getattr(f64, field), getattr(ref64, field))


@pytest.mark.parametrize("compat_topk", [False, True])
def test_cluster_keypoint_recovered_from_tables(compat_topk):
  g = load_golden("cps.npz")
  r = _golden_run(96, compat_topk, True)
  got = clustering.cluster_keypoint_from_prototypes(r.prototypes, g["proto"])
  np.testing.assert_array_equal(got, r.closest_keypoint)
  assert got.dtype == np.int32
  # A checkpoint's keypoint table is normalised again before matching.
  got = clustering.cluster_keypoint_from_prototypes(r.prototypes, 1.001 * g["proto"])
  np.testing.assert_array_equal(got, r.closest_keypoint)


def test_cluster_keypoint_of_random_table_is_none():
  g = load_golden("cps.npz")
  rs = np.random.RandomState(6)
  random_table = _normalize(rs.randn(96, 3, 64)).astype(np.float32)
  assert clustering.cluster_keypoint_from_prototypes(random_table, g["proto"]) is None
  # One foreign cluster is enough.
  table = np.array(_golden_run(96, False, True).prototypes)
  table[5, 0] += 1e-3
  assert clustering.cluster_keypoint_from_prototypes(table, g["proto"]) is None


# Three datasets: global keypoints [0, 2), [2, 5), [5, 9); K_max = 4.
_OFFSETS = (0, 2, 5)
_NUM_KPTS = (2, 3, 4)


def _batch():
  b, k_max, h, w = 6, 4, 2, 3
  ds = np.array([2, 0, 1, 2, 1, 0], np.int32)
  # Each (sample, channel) holds its own constant, so a wrong gather shows.
  target = (np.arange(b)[:, None, None, None] * 10 + np.arange(k_max)[None, :, None, None] + 1
            + np.zeros((b, k_max, h, w))).astype(np.float32)
  weight = (np.arange(b)[:, None] * 100 + np.arange(k_max)[None, :] + 1).astype(np.float32)
  for i, d in enumerate(ds):  # Zero beyond K_d, as the padded batches are.
    target[i, _NUM_KPTS[d]:] = 0
    weight[i, _NUM_KPTS[d]:] = 0
  # Clusters: global 5 (ds 2, k 0), 0 (ds 0, k 0), 3 (ds 1, k 1), 8 (ds 2, k 3), 1 (ds 0, k 1),
  # 3 again (two clusters may share a keypoint), -1 (the pre-CPS placeholder), 9 (no dataset).
  closest = np.array([5, 0, 3, 8, 1, 3, -1, 9], np.int32)
  return target, weight, ds, closest


def _reference_blocks(target, weight, ds, closest):
  """The reference's `get_cps_loss` loop: per dataset present, blocks concatenated in order."""
  num_c = len(closest)
  tcs, wcs, rows = [], [], []
  for d, (s, k) in enumerate(zip(_OFFSETS, _NUM_KPTS)):
    sel = np.nonzero(ds == d)[0]
    if len(sel) == 0:
      continue
    cst_idx = np.nonzero((closest >= s) & (closest < s + k))[0]
    kpt_idx = closest[cst_idx] - s
    tc = np.zeros((len(sel), num_c) + target.shape[2:], target.dtype)
    wc = np.zeros((len(sel), num_c), weight.dtype)
    tc[:, cst_idx] = target[sel][:, kpt_idx]
    wc[:, cst_idx] = weight[sel][:, kpt_idx]
    tcs.append(tc)
    wcs.append(wc)
    rows.append(sel)
  return np.concatenate(tcs), np.concatenate(wcs), np.concatenate(rows)


def test_cluster_targets_hand_built():
  target, weight, ds, closest = _batch()
  tc, wc = clustering.cluster_targets(target, weight, ds, closest, offsets=_OFFSETS,
                                      num_keypoints=_NUM_KPTS)
  assert tc.shape == (6, 8, 2, 3) and wc.shape == (6, 8)
  # Local keypoint each cluster takes, per dataset (None: zeros).
  local = {0: [None, 0, None, None, 1, None, None, None],
           1: [None, None, 1, None, None, 1, None, None],
           2: [0, None, None, 3, None, None, None, None]}
  for b, d in enumerate(ds):
    for c, k in enumerate(local[d]):
      want_t = 0.0 if k is None else target[b, k]
      want_w = 0.0 if k is None else weight[b, k]
      np.testing.assert_array_equal(tc[b, c], np.broadcast_to(want_t, (2, 3)))
      assert wc[b, c] == want_w
  # Sample 0 (dataset 2) gets its channel 0 in cluster 0 and channel 3 in cluster 3.
  assert tc[0, 0, 0, 0] == 1 and tc[0, 3, 0, 0] == 4 and wc[0, 3] == 4


def test_cluster_targets_match_reference_concatenation():
  target, weight, ds, closest = _batch()
  ref_t, ref_w, rows = _reference_blocks(target, weight, ds, closest)
  run = jax.jit(functools.partial(clustering.cluster_targets, offsets=_OFFSETS,
                                  num_keypoints=_NUM_KPTS), static_argnames="compat_order")
  tc, wc = run(target, weight, ds, closest, compat_order=True)
  np.testing.assert_array_equal(tc, ref_t)
  np.testing.assert_array_equal(wc, ref_w)
  # Intended: the same rows scattered back to their batch positions.
  tc, wc = run(target, weight, ds, closest, compat_order=False)
  np.testing.assert_array_equal(np.asarray(tc)[rows], ref_t)
  np.testing.assert_array_equal(np.asarray(wc)[rows], ref_w)
  # The batch is mixed, so the two orders really differ (the §6.7 misalignment).
  assert not np.array_equal(rows, np.arange(len(ds)))
