"""Prototype math: initialisation, heatmaps, gradients, channel gathering.

The prototype learning rule (Sinkhorn + EMA) is tested in tests/test_prototype_learning.py.
"""

import jax
import jax.numpy as jnp
import numpy as np

from posebh_jax.objective import prototypes as proto_lib


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
