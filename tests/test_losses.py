import jax.numpy as jnp
import numpy as np

from posebh_jax.objective import losses


def test_joints_mse_matches_reference_normalisation():
  rs = np.random.RandomState(0)
  pred, gt = rs.rand(3, 5, 4, 6).astype(np.float32), rs.rand(3, 5, 4, 6).astype(np.float32)
  w = (rs.rand(3, 5) > 0.4).astype(np.float32)
  expected = np.sum(w[:, :, None, None] ** 2 * (pred - gt) ** 2) / (5 * 3 * 4 * 6)
  np.testing.assert_allclose(losses.joints_mse(pred, gt, w), expected, rtol=1e-6)


def test_multi_head_loss_zeroes_other_datasets_and_averages_over_whole_batch():
  rs = np.random.RandomState(1)
  b, k_max, h, w = 4, 5, 3, 2
  target = rs.rand(b, k_max, h, w).astype(np.float32)
  weight = np.ones((b, k_max), np.float32)
  ds = np.array([0, 1, 1, 0], np.int32)
  heads = [rs.rand(b, 5, h, w).astype(np.float32), rs.rand(b, 3, h, w).astype(np.float32)]
  total, per_head = losses.multi_head_heatmap_loss(heads, target, weight, ds)
  for d, hm in enumerate(heads):
    k = hm.shape[1]
    sel = (ds == d)[:, None, None, None]
    expected = np.sum(sel * (hm - target[:, :k]) ** 2) / (k * b * h * w)
    np.testing.assert_allclose(per_head[d], expected, rtol=1e-6)
  np.testing.assert_allclose(total, per_head.sum(), rtol=1e-6)


def test_per_dataset_mse_uses_own_samples_and_own_k():
  rs = np.random.RandomState(2)
  pred = rs.rand(3, 4, 2, 2).astype(np.float32)
  target = rs.rand(3, 4, 2, 2).astype(np.float32)
  weight = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], np.float32)
  ds = np.array([0, 1, 1], np.int32)
  got = jnp.sum(losses.per_dataset_joints_mse_terms(jnp.asarray(pred), target, weight, ds, (4, 2)))
  err = weight[:, :, None, None] ** 2 * (pred - target) ** 2
  expected = err[0].sum() / (1 * 4 * 4) + err[1:].sum() / (2 * 2 * 4)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # A dataset absent from the batch contributes nothing (no division by zero).
  got = jnp.sum(losses.per_dataset_joints_mse_terms(jnp.asarray(pred), target, weight, ds,
                                                   (4, 2, 3)))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
