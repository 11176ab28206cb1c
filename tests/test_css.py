"""Cross-type self-supervision targets and losses vs a literal numpy port of the reference.

The port (`_reference_css`) follows `KptProtoHead.get_css_loss` for one skeleton d line by line:
boolean indexing, numpy `get_max_preds` + `post_dark_udp` on the kept heatmaps, the UDP
generator with image size = heatmap size, then scattering back into `[n_I, K, h, w]`.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data_pipelines import heatmap_codec
from posebh_jax.objective import css
from posebh_jax.objective.compat import ReferenceCompat

B, K, HM_H, HM_W = 16, 6, 64, 48
CONF_THR, MATCH_DIST, SIGMA, KERNEL = 0.25, 2.1, 2.0, 11


# --------------------------------------------------------------------------------------
# Numpy reference (spec §2.6.5 as implemented, with the two §6 switches).
# --------------------------------------------------------------------------------------


def _reference_css(hm: np.ndarray, phm: np.ndarray, foreign: np.ndarray, *,
                   compat_distance: bool, compat_pseudo: bool) -> dict | None:
  """`get_css_loss` for one d; returns batch-aligned targets and the two (unweighted) losses."""
  mh_hm_di = hm[foreign]
  prt_hm_di = phm[foreign]
  nd, kd, h, w = mh_hm_di.shape
  hm_di_v = (mh_hm_di.max(axis=(2, 3)) > CONF_THR) & (prt_hm_di.max(axis=(2, 3)) > CONF_THR)
  if hm_di_v.sum() == 0:
    return None
  hx, hy = np.argmax(mh_hm_di.max(2), axis=2), np.argmax(mh_hm_di.max(3), axis=2)
  gx, gy = np.argmax(prt_hm_di.max(2), axis=2), np.argmax(prt_hm_di.max(3), axis=2)
  second = (gx - gy) if compat_distance else (hy - gy)
  max_idx_v = np.sqrt(((hx - gx)**2 + second**2).astype(np.float32)) <= MATCH_DIST
  filter_mask = hm_di_v & max_idx_v
  inst = filter_mask.sum(axis=1) > 0
  n_inst = int(inst.sum())
  if n_inst == 0:
    return None
  joint_mask = filter_mask[inst]
  mh_hm_di, prt_hm_di = mh_hm_di[inst], prt_hm_di[inst]
  mh_f, prt_f = mh_hm_di[joint_mask], prt_hm_di[joint_mask]  # [Nf, h, w]

  def get_css_preds(x):
    x = np.array(x, np.float32)
    preds, maxvals = heatmap_codec.get_max_preds(x)
    return heatmap_codec.post_dark_udp(preds, x, kernel=KERNEL), maxvals

  mh_preds, mh_max = (a[0] for a in get_css_preds(mh_f[None]))
  prt_preds, prt_max = (a[0] for a in get_css_preds(prt_f[None]))
  s = np.clip(mh_max + prt_max, 1.0e-4, None)
  maxvals_min = np.min(np.stack((mh_max, prt_max)), axis=0)
  second_term = prt_max if compat_pseudo else prt_preds
  pseudo = (mh_max / s) * mh_preds + (prt_max / s) * second_term
  all_valid = (mh_max > CONF_THR) * (prt_max > CONF_THR) * 1.0
  t, _ = heatmap_codec.udp_target(pseudo, all_valid[:, 0], (w, h), (w, h), SIGMA)

  css_target = np.zeros((n_inst, kd, h, w), np.float32)
  css_weight = np.zeros((n_inst, kd, 1), np.float32)
  css_target[joint_mask] = t
  css_weight[joint_mask] = maxvals_min

  def mse(pred):  # mmpose JointsMSELoss with target weights.
    wt = css_weight[:, :, :, None]
    return np.mean((pred * wt - css_target * wt)**2)

  full_t = np.zeros(hm.shape, np.float32)
  full_w = np.zeros(hm.shape[:2], np.float32)
  full_i = np.zeros(hm.shape[0], bool)
  rows = np.flatnonzero(foreign)[inst]
  full_t[rows], full_w[rows], full_i[rows] = css_target, css_weight[..., 0], True
  return dict(target=full_t, weight=full_w, instances=full_i, hm=mse(mh_hm_di),
              ph=mse(prt_hm_di), weighted=css_target * css_weight[:, :, :, None], rows=rows)


# --------------------------------------------------------------------------------------
# Synthetic heatmaps.
# --------------------------------------------------------------------------------------


def _bump(x: float, y: float, amp: float, s: float = 2.0) -> np.ndarray:
  yy, xx = np.mgrid[0:HM_H, 0:HM_W]
  return amp * np.exp(-((xx - x)**2 + (yy - y)**2) / (2 * s * s))


def _make_batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Head / prototype heatmaps mixing every case the filters distinguish.

  Pair kinds: agreeing peaks; far-apart peaks; one side below the confidence threshold;
  prototype peak on the diagonal (gx ≈ gy) with a head peak at the same x but another y, which
  only the reference's distance test keeps. Samples 2 and 3 are foreign but have no agreeing
  pair; sample 0 is own-dataset. Every map has a faint second bump and a small
  positive floor so decoding sees realistic, strictly positive heatmaps.
  """
  rng = np.random.default_rng(seed)
  hm = np.zeros((B, K, HM_H, HM_W), np.float32)
  phm = np.zeros_like(hm)
  for b in range(B):
    for k in range(K):
      kind = rng.choice(['agree', 'far', 'low', 'diag_agree', 'diag_split'],
                        p=[0.4, 0.15, 0.15, 0.15, 0.15])
      kind = {2: 'far', 3: 'low'}.get(b, kind)  # Foreign samples outside I.
      a_h, a_g = rng.uniform(0.35, 1.0, size=2)
      if kind in ('agree', 'far', 'low'):
        hx, hy = rng.uniform(1, HM_W - 2), rng.uniform(1, HM_H - 2)
        if kind == 'far':
          gx, gy = (hx + rng.uniform(8, 20)) % HM_W, (hy + rng.uniform(8, 20)) % HM_H
        else:
          gx, gy = hx + rng.uniform(-1.2, 1.2), hy + rng.uniform(-1.2, 1.2)
        if kind == 'low':
          if rng.random() < 0.5:
            a_h = rng.uniform(0.05, 0.2)
          else:
            a_g = rng.uniform(0.05, 0.2)
      else:
        gx = rng.uniform(2, HM_W - 3)
        gy = gx + rng.uniform(-0.8, 0.8)
        hx = gx + rng.uniform(-1.0, 1.0)
        hy = gy + (rng.uniform(-1.0, 1.0) if kind == 'diag_agree' else rng.uniform(6, 14))
      hm[b, k] = _bump(hx, hy, a_h) + _bump(rng.uniform(0, HM_W), rng.uniform(0, HM_H), 0.1, 3.0)
      phm[b, k] = _bump(gx, gy, a_g, 2.5) + 0.01
  foreign = rng.random(B) < 0.75
  foreign[:4] = [False, True, True, True]
  return hm, phm, foreign


@pytest.fixture(scope='module')
def batch():
  return _make_batch(0)


# Jitted once per (shape, flags): compiling dominates this file's runtime, so every test reuses
# the batch shape and these wrappers.
css_targets = jax.jit(css.css_targets,
                      static_argnames=('conf_thr', 'match_dist', 'sigma', 'kernel', 'compat'))
css_heatmap_loss = jax.jit(css.css_heatmap_loss)
css_pixel_classes = jax.jit(css.css_pixel_classes)
peak_match = jax.jit(css.peak_match, static_argnames=('conf_thr', 'match_dist', 'compat_distance'))

COMPAT = {
    'intended': ReferenceCompat(),
    'reference': ReferenceCompat(css_pseudo_keypoint=True, css_peak_distance=True),
    'distance_only': ReferenceCompat(css_peak_distance=True),
    'pseudo_only': ReferenceCompat(css_pseudo_keypoint=True),
}


def _run(hm, phm, foreign, mode: str):
  t = css_targets(hm, phm, foreign, conf_thr=CONF_THR, match_dist=MATCH_DIST, sigma=SIGMA,
                  kernel=KERNEL, compat=COMPAT[mode])
  return t, css_heatmap_loss(hm, t), css_heatmap_loss(phm, t)


@pytest.fixture(scope='module')
def results(batch):
  return {mode: _run(*batch, mode) for mode in COMPAT}


# --------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize('mode', list(COMPAT))
def test_css_matches_reference_port(batch, results, mode):
  hm, phm, foreign = batch
  compat = COMPAT[mode]
  ref = _reference_css(hm, phm, foreign, compat_distance=compat.css_peak_distance,
                       compat_pseudo=compat.css_pseudo_keypoint)
  assert ref is not None and 2 <= ref['instances'].sum() < foreign.sum()
  t, hm_loss, ph_loss = results[mode]
  np.testing.assert_array_equal(np.asarray(t.instances), ref['instances'])
  np.testing.assert_array_equal(np.asarray(t.weight) > 0, ref['weight'] > 0)
  np.testing.assert_allclose(np.asarray(t.weight), ref['weight'], rtol=1e-6, atol=0)
  # DARK-UDP in JAX (float32 solve, non-OpenCV blur) moves the pseudo keypoint by ~1e-6 px.
  np.testing.assert_allclose(np.asarray(t.target), ref['target'], rtol=0, atol=1e-5)
  np.testing.assert_allclose(float(hm_loss), ref['hm'], rtol=1e-5)
  np.testing.assert_allclose(float(ph_loss), ref['ph'], rtol=1e-5)
  assert not np.asarray(t.instances)[~foreign].any()  # Own-dataset samples never get a target.

  # Prototype-learning pixels: the reference's hm_sample(emb, T·W, 0.0) on the subset I.
  local_class, conf, valid = (np.asarray(a) for a in css_pixel_classes(t))
  rows = ref['rows']
  weighted = ref['weighted'].reshape(len(rows), K, -1)
  ref_conf, ref_cls = weighted.max(axis=1), weighted.argmax(axis=1)
  ref_valid = np.zeros(valid.shape, bool)
  ref_valid[rows] = (ref_conf > 0.0).reshape(-1, HM_H, HM_W)
  np.testing.assert_array_equal(valid, ref_valid)
  sel = ref_valid[rows].reshape(len(rows), -1)
  np.testing.assert_array_equal(local_class[rows].reshape(sel.shape)[sel], ref_cls[sel])
  np.testing.assert_allclose(conf[rows].reshape(sel.shape)[sel], ref_conf[sel], atol=1e-5)


def _single_pair(h_map: np.ndarray, g_map: np.ndarray) -> tuple[np.ndarray, ...]:
  """One hand-made pair at (sample 0, keypoint 0) of an otherwise empty batch-shaped input."""
  hm = np.zeros((B, K, HM_H, HM_W), np.float32)
  phm = np.zeros_like(hm)
  hm[0, 0], phm[0, 0] = h_map, g_map
  return hm, phm, np.ones(B, bool)


def test_distance_flag(results):
  # A pair with hy far from gy but the prototype peak on the diagonal (gx ≈ gy): only the
  # reference's distance (§6.2) keeps it.
  pair = _single_pair(_bump(20.0, 30.0, 0.9), _bump(20.3, 20.2, 0.8))
  assert not bool(peak_match(pair[0], pair[1])[0, 0])
  assert bool(peak_match(pair[0], pair[1], compat_distance=True)[0, 0])
  assert not bool(_run(*pair, 'pseudo_only')[0].instances[0])
  assert bool(_run(*pair, 'distance_only')[0].instances[0])
  # On the random batch: the distance flag changes the keep set, the pseudo flag does not.
  weight = {m: np.asarray(r[0].weight) for m, r in results.items()}
  np.testing.assert_array_equal(weight['pseudo_only'], weight['intended'])
  np.testing.assert_array_equal(weight['distance_only'], weight['reference'])
  assert ((weight['distance_only'] > 0) != (weight['intended'] > 0)).any()


def test_pseudo_keypoint_flag(results):
  # Same kept pairs; the reference (§6.1) adds c_g²/s to x and y instead of averaging p_g in.
  target = {m: np.asarray(r[0].target) for m, r in results.items()}
  assert np.abs(target['pseudo_only'] - target['intended']).max() > 0.1
  assert np.abs(target['distance_only'] - target['intended']).max() > 0.1  # Other pairs kept.
  pair = _single_pair(_bump(20.0, 30.0, 0.9), _bump(20.4, 30.4, 0.8, 2.5))
  c_h, c_g = pair[0][0, 0].max(), pair[1][0, 0].max()  # Raw maxima: 0.9 and ≈ 0.78.
  peak = lambda t: np.unravel_index(np.argmax(np.asarray(t.target[0, 0])), (HM_H, HM_W))
  intended, reference = _run(*pair, 'intended')[0], _run(*pair, 'pseudo_only')[0]
  assert bool(intended.instances[0]) and bool(reference.instances[0])
  # Intended: the confidence-weighted mean of (20, 30) and (20.4, 30.4) → ≈ (20.19, 30.19).
  assert peak(intended) == (30, 20)
  # Reference: c_h/s·(20, 30) + c_g²/s → ≈ (11.08, 16.43).
  expect = c_h / (c_h + c_g) * np.array([20.0, 30.0]) + c_g * c_g / (c_h + c_g)
  assert peak(reference) == (round(expect[1]), round(expect[0])) == (16, 11)
  for t in (intended, reference):  # Weight min(c_h, c_g) either way.
    assert float(t.weight[0, 0]) == pytest.approx(min(c_h, c_g), rel=1e-6)


def test_dark_udp_coords_match_numpy():
  rng = np.random.default_rng(1)
  hm = np.zeros((4, 5, HM_H, HM_W), np.float32)
  for i in range(4):
    for k in range(5):
      hm[i, k] = (_bump(rng.uniform(0, HM_W - 1), rng.uniform(0, HM_H - 1), rng.uniform(0.3, 1))
                  + _bump(rng.uniform(0, HM_W), rng.uniform(0, HM_H), 0.2, 4.0))
  coords, maxvals = jax.jit(heatmap_codec.dark_udp_coords_jax)(hm)
  ref, ref_max = heatmap_codec.get_max_preds(hm)
  ref = heatmap_codec.post_dark_udp(ref, hm.copy(), kernel=KERNEL)
  np.testing.assert_allclose(np.asarray(coords), ref, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(maxvals), ref_max[..., 0])


def test_udp_heatmaps_match_generator():
  rng = np.random.default_rng(2)
  w, h = HM_W, HM_H
  # Borders, windows just inside/outside the bounds test, trunc ≠ floor for x + 0.5 < 0, and a
  # float32 x whose float32 x + 0.5 would round up to the next integer.
  edge = np.array([
      [0.0, 0.0], [-0.5, -0.5], [-0.4999, 3.0], [-0.5001, 3.0], [0.49999997, 0.5],
      [-6.5, 10.0], [-6.49, 10.0], [-7.5, 10.0], [-7.49, 10.0], [-6.6, -6.6],
      [w - 1.0, h - 1.0], [w + 5.49, 20.0], [w + 5.5, 20.0], [w + 6.5, 20.0],
      [10.0, h + 5.49], [10.0, h + 5.5], [23.5, 31.5], [22.5, 30.5], [-1e6, 5.0],
      [np.nan, 5.0], [5.0, np.inf], [12.25, -2.75]], np.float32)
  rand = np.stack([rng.uniform(-10, w + 10, 200), rng.uniform(-10, h + 10, 200)], -1)
  coords = np.concatenate([edge, rand.astype(np.float32)])
  valid = np.ones(len(coords), np.float32)
  valid[::7] = 0.0
  ref_t, ref_w = heatmap_codec.udp_target(coords, valid, (w, h), (w, h), SIGMA)
  udp = jax.jit(heatmap_codec.udp_heatmaps_jax, static_argnums=(2, 3))
  t, wt = udp(coords, valid, (h, w), SIGMA)
  np.testing.assert_array_equal(np.asarray(wt), ref_w)
  np.testing.assert_allclose(np.asarray(t), ref_t, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(t) > 0, ref_t > 0)  # Same windows, pixel for pixel.
  # Leading batch axes and a bool validity.
  t2, w2 = udp(coords.reshape(2, -1, 2), valid.reshape(2, -1) > 0.5, (h, w), SIGMA)
  np.testing.assert_array_equal(np.asarray(t2).reshape(t.shape), np.asarray(t))
  np.testing.assert_array_equal(np.asarray(w2).reshape(-1), ref_w)


def test_gradients_only_through_pred(batch, results):
  hm, phm, foreign = batch

  def loss(h, g):
    return css.css_heatmap_loss(h, css.css_targets(h, g, foreign))

  grad_h, grad_g = (np.asarray(g) for g in jax.jit(jax.grad(loss, argnums=(0, 1)))(hm, phm))
  t = results['intended'][0]
  inst, wt = np.asarray(t.instances), np.asarray(t.weight)
  assert np.all(grad_h[~inst] == 0) and np.abs(grad_h[inst]).max() > 0
  assert np.all(grad_h[wt == 0] == 0)
  np.testing.assert_array_equal(grad_g, 0.0)  # Targets are constants: nothing reaches G.
  # Exactly the gradient of MSE_J with fixed targets: 2w²(H − T)/(K·n_I·h·w).
  expect = (2 * wt[:, :, None, None]**2 * (hm - np.asarray(t.target)) /
            (K * inst.sum() * HM_H * HM_W))
  np.testing.assert_allclose(grad_h, expect, rtol=1e-5, atol=1e-12)


def test_empty_subset_gives_zero(batch):
  hm, phm, _ = batch
  t, hm_loss, ph_loss = _run(hm, phm, np.zeros(B, bool), 'intended')
  assert not np.asarray(t.instances).any()
  np.testing.assert_array_equal(np.asarray(t.target), 0.0)
  np.testing.assert_array_equal(np.asarray(t.weight), 0.0)
  assert float(hm_loss) == 0.0 and float(ph_loss) == 0.0
  assert not np.asarray(css_pixel_classes(t)[2]).any()


def test_sharded_batch_matches_single_device(batch, results):
  hm, phm, foreign = batch
  devices = np.array(jax.devices())
  assert len(devices) == 8
  shard = NamedSharding(Mesh(devices, ('data',)), P('data'))
  args = [jax.device_put(x, shard) for x in (hm, phm, foreign)]
  out = _run(*args, 'intended')
  assert out[0].target.sharding.is_equivalent_to(shard, 4)  # Stays batch-sharded.
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(results['intended'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)


@pytest.mark.parametrize('mode', ['intended', 'reference'])
def test_dropping_an_empty_pixel_set_changes_nothing(mode):
  # Spec §6.17: the reference drops a dataset's CSS hm/ph terms when its sampled pixel set is
  # empty; the objective keeps that `where` (no switch), which is only right if those terms are
  # 0 then anyway. They are: a kept pair's pseudo keypoint lies between two in-heatmap peaks, so
  # its UDP Gaussian has a pixel above 0, and no kept pair means every weight is 0. Checked on
  # random batches, per sample (one sample = one dataset's subset), with both CSS flag sets.
  empty = nonempty = 0
  for seed in range(1, 9):
    hm, phm, foreign = _make_batch(seed)
    for b in range(B):
      one = np.zeros(B, bool)
      one[b] = foreign[b]
      t, hm_loss, ph_loss = _run(hm, phm, one, mode)
      valid = np.asarray(css_pixel_classes(t)[2])
      if valid.any():
        nonempty += 1
      else:
        empty += 1
        assert float(hm_loss) == 0.0 and float(ph_loss) == 0.0, (seed, b)
        np.testing.assert_array_equal(np.asarray(t.weight), 0.0)
  assert empty and nonempty  # Both cases were met.
