"""Prototype math: heatmaps, gradients, and the EMA update over fixed shapes."""

import jax
import jax.numpy as jnp
import numpy as np

from posebh_jax import prototypes as proto_lib


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_init_is_unit_norm():
  p = proto_lib.init_prototypes(jax.random.key(0), 10, 3, 8)
  assert p.shape == (10, 3, 8)
  np.testing.assert_allclose(np.linalg.norm(p, axis=-1), 1.0, rtol=1e-6)


def test_prototype_heatmap_is_clipped_max_abs_cosine():
  rs = np.random.RandomState(0)
  emb = rs.randn(2, 3, 4, 5).astype(np.float32)
  protos = _normalize(rs.randn(6, 3, 5)).astype(np.float32)
  phm = proto_lib.prototype_heatmap(emb, protos)
  cos = np.abs(np.einsum("bhwe,jme->bhwjm", _normalize(emb), protos)).max(-1)
  np.testing.assert_allclose(phm, np.clip(cos, 1e-4, 1 - 1e-4).transpose(0, 3, 1, 2), atol=1e-6)


def test_gradient_reaches_embedding_but_not_prototypes():
  rs = np.random.RandomState(1)
  emb = jnp.asarray(rs.randn(1, 2, 2, 4), jnp.float32)
  protos = jnp.asarray(_normalize(rs.randn(3, 2, 4)), jnp.float32)
  g_emb, g_p = jax.grad(lambda e, p: proto_lib.prototype_heatmap(e, p).sum(), (0, 1))(emb, protos)
  assert np.abs(g_emb).sum() > 0
  np.testing.assert_array_equal(g_p, 0.0)


def test_gather_dataset_channels():
  phm = jnp.arange(2 * 5).reshape(2, 5).astype(jnp.float32)
  gidx = jnp.asarray([[0, 1, 0], [2, 3, 4]])
  out = proto_lib.gather_dataset_channels(phm, jnp.asarray([1, 0]), gidx)
  np.testing.assert_array_equal(out, [[2, 3, 4], [5, 6, 5]])


def test_ema_moves_only_classes_with_confident_pixels():
  j, m, e = 5, 2, 4
  rs = np.random.RandomState(2)
  protos = _normalize(rs.randn(j, m, e)).astype(np.float32)
  v = _normalize(protos[3, 1] + 0.3 * rs.randn(e)).astype(np.float32)  # Nearest to (3, 1).
  emb = np.tile(rs.randn(e).astype(np.float32), (1, 2, 3, 1))  # [1, 2, 3, E] background
  emb[0, 0, 1] = v * 2.5  # Scale must not matter (embeddings are normalised).
  target = np.zeros((1, 2, 2, 3), np.float32)  # Dataset with K=2 local keypoints.
  target[0, 1, 0, 1] = 0.9  # Local keypoint 1 → global id 3 at pixel (0, 1).
  target[0, 0, 1, 2] = 0.2  # Below the threshold: ignored.
  weight = np.ones((1, 2), np.float32)
  gidx = jnp.asarray([[2, 3]])
  new = proto_lib.ema_update(jnp.asarray(protos), emb, target, weight, jnp.asarray([0]), gidx,
                             gamma=0.9, threshold=0.5)
  want = _normalize(0.9 * protos[3, 1] + 0.1 * v)
  np.testing.assert_allclose(new[3, 1], want, atol=1e-6)
  mask = np.ones((j, m), bool)
  mask[3, 1] = False
  np.testing.assert_allclose(np.asarray(new)[mask], protos[mask], atol=1e-6)
  # A zero target weight (unlabelled keypoint) stops the update entirely.
  new0 = proto_lib.ema_update(jnp.asarray(protos), emb, target, np.zeros_like(weight),
                              jnp.asarray([0]), gidx, gamma=0.9, threshold=0.5)
  np.testing.assert_allclose(new0, protos, atol=1e-6)


def test_ema_uses_the_class_mean_of_all_pixels():
  protos = np.zeros((1, 1, 2), np.float32)
  protos[0, 0] = [1.0, 0.0]
  emb = np.zeros((2, 1, 1, 2), np.float32)
  emb[0, 0, 0] = [0.0, 1.0]
  emb[1, 0, 0] = [1.0, 1.0]
  target = np.ones((2, 1, 1, 1), np.float32)
  new = proto_lib.ema_update(jnp.asarray(protos), emb, target, np.ones((2, 1), np.float32),
                             jnp.asarray([0, 0]), jnp.asarray([[0]]), gamma=0.5, threshold=0.5)
  mean = _normalize(np.array([0, 1]) + _normalize(np.array([1.0, 1.0])))
  np.testing.assert_allclose(new[0, 0], _normalize(0.5 * protos[0, 0] + 0.5 * mean), atol=1e-6)
