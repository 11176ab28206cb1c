"""The PoseBH objective: which inputs each loss term sends gradients to (spec §2.6).

Built on hand-made model outputs, so that every term is active: heads and prototype heatmaps
agree on peaks (CSS keeps pairs), targets have pixels (prototype CE, CPS).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posebh_jax.models.posebh import ModelOutputs
from posebh_jax.objective import clustering, objective
from posebh_jax.objective.compat import ReferenceCompat

NUM_KPTS = (3, 4)  # Two datasets: global ids 0-2 and 3-6.
B, H, W, E, M, C = 4, 16, 12, 32, 2, 3


def _gauss(cx, cy, amp=1.0):
  yy, xx = np.mgrid[0:H, 0:W]
  g = amp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 8.0)
  return np.where(g > 1.2e-4, g, 0.0).astype(np.float32)


def _problem(seed=0):
  """Outputs where each foreign head/prototype pair agrees on one peak per sample."""
  rs = np.random.RandomState(seed)
  j = sum(NUM_KPTS)
  protos = rs.randn(j, M, E).astype(np.float32)
  protos /= np.linalg.norm(protos, axis=-1, keepdims=True)
  ds = np.array([0, 0, 1, 1], np.int32)
  # Background embeddings far from every prototype (random directions in 32-d: |cos| ~ 0.15).
  emb = rs.randn(B, H, W, E).astype(np.float32)
  heads = [np.full((B, k, H, W), 0.01, np.float32) for k in NUM_KPTS]
  target = np.zeros((B, max(NUM_KPTS), H, W), np.float32)
  weight = np.zeros((B, max(NUM_KPTS)), np.float32)
  offsets = (0, NUM_KPTS[0])
  for b in range(B):
    d_own = ds[b]
    for k in range(NUM_KPTS[d_own]):  # Own keypoints: ground truth targets.
      x, y = 2 + 2 * k, 3 + 3 * k
      target[b, k] = _gauss(x, y)
      weight[b, k] = 1.0
      heads[d_own][b, k] = _gauss(x, y, 0.9)
    d_other = 1 - d_own  # One foreign keypoint: the head and the prototype heatmap agree.
    x, y = 9, 12
    heads[d_other][b, 0] = _gauss(x, y, 0.8)
    emb[b, y, x] = 3.0 * protos[offsets[d_other], 0]  # |cos| = 1 with that keypoint's prototype.
  return ds, emb, heads, target, weight, protos


def _cfg(**kw):
  base = dict(num_keypoints=NUM_KPTS, gumbel=False, update_prototypes=False, cps=True, css=True,
              css_dark_kernel=5, css_weight=1.0, cps_weight=1.0)
  base.update(kw)
  return objective.ObjectiveConfig(**base)


def _loss(cfg, ds, emb, heads, target, weight, protos, cluster, ckpt):
  def f(heads, emb, protos, cluster):
    out = ModelOutputs(heatmaps=tuple(heads), embedding=emb, features=jnp.zeros((B, 1, 1, 1)))
    state = objective.PrototypeState(protos, cluster, ckpt)
    total, metrics, _ = objective.posebh_objective(
        out, dict(target=target, dataset_index=ds), weight, state, jax.random.key(0), cfg)
    return total, metrics
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
      [jnp.asarray(h) for h in heads], jnp.asarray(emb), jnp.asarray(protos), jnp.asarray(cluster))


@pytest.fixture(scope="module")
def problem():
  ds, emb, heads, target, weight, protos = _problem()
  table, closest = clustering.init_clusters(protos, C, iterations=20, beta=20.0,
                                           compat=ReferenceCompat())
  return ds, emb, heads, target, weight, protos, table, closest


def test_css_keeps_the_agreeing_foreign_pairs(problem):
  (_, metrics), _ = _loss(_cfg(), *problem)
  assert metrics["css/kept_pairs"] == B  # One agreeing foreign pair per sample.
  assert metrics["loss/css"] > 0 and metrics["loss/cps"] > 0 and metrics["loss/proto_ce"] > 0


def test_css_heatmap_term_reaches_only_the_foreign_kept_head_channels(problem):
  ds = problem[0]
  cfg = _cfg(heatmap_weight=0.0, proto_weight=0.0, phm_weight=0.0, cps=False)
  (_, metrics), (g_heads, g_emb, g_protos, g_cluster) = _loss(cfg, *problem)
  assert metrics["loss/css"] > 0
  for d, g in enumerate(g_heads):
    g = np.asarray(g)
    for b in range(B):
      if ds[b] == d:  # A dataset's own samples never get pseudo labels from its head.
        np.testing.assert_array_equal(g[b], 0.0)
      else:
        assert np.abs(g[b, 0]).max() > 0  # The kept pair's channel.
        np.testing.assert_array_equal(g[b, 1:], 0.0)
  np.testing.assert_array_equal(g_emb, 0.0)  # ph and pp have zero weight here.
  np.testing.assert_array_equal(g_protos, 0.0)
  np.testing.assert_array_equal(g_cluster, 0.0)


def test_prototype_terms_reach_only_the_embedding(problem):
  cfg = _cfg(heatmap_weight=0.0, css=False)
  (_, metrics), (g_heads, g_emb, g_protos, g_cluster) = _loss(cfg, *problem)
  assert metrics["loss/proto_ce"] > 0 and metrics["loss/phm"] > 0 and metrics["loss/cps"] > 0
  for g in g_heads:
    np.testing.assert_array_equal(g, 0.0)
  assert np.abs(np.asarray(g_emb)).max() > 0
  np.testing.assert_array_equal(g_protos, 0.0)  # Prototypes are EMA state, never gradients.
  np.testing.assert_array_equal(g_cluster, 0.0)


def test_heatmap_loss_reaches_each_head_only_through_its_own_samples(problem):
  ds = problem[0]
  cfg = _cfg(proto_weight=0.0, phm_weight=0.0, cps=False, css=False)
  (_, _), (g_heads, g_emb, _, _) = _loss(cfg, *problem)
  for d, g in enumerate(g_heads):
    g = np.asarray(g)
    assert np.abs(g[ds == d]).max() > 0
    np.testing.assert_array_equal(g[ds != d], 0.0)  # Zero target weight for other datasets.
  np.testing.assert_array_equal(g_emb, 0.0)


def test_cps_cluster_term_changes_only_with_the_cluster_table(problem):
  ds, emb, heads, target, weight, protos, table, closest = problem
  (l1, m1), _ = _loss(_cfg(css=False), *problem)
  (l2, m2), _ = _loss(_cfg(css=False), ds, emb, heads, target, weight, protos, table[::-1].copy(),
                      closest[::-1].copy())
  # Reversing the cluster order together with its keypoint map is a relabelling: same cluster
  # heatmap loss. (The pixel CE may differ: clusters sharing a keypoint tie in the pixel argmax,
  # which takes the first cluster.)
  np.testing.assert_allclose(m1["cps/cluster_heatmap"], m2["cps/cluster_heatmap"], rtol=1e-5)
  assert m1["cps/cluster_heatmap"] > 0
  placeholder = np.full_like(closest, -1)
  (_, m3), _ = _loss(_cfg(css=False), ds, emb, heads, target, weight, protos, table, placeholder)
  # Without a keypoint map no cluster has a target: the cluster-heatmap term vanishes.
  assert m3["cps/cluster_heatmap"] == 0.0


def test_cps_target_order_compat_misaligns_batches_of_mixed_datasets(problem):
  ds, emb, heads, target, weight, protos, table, closest = problem
  mixed = np.array([1, 0, 1, 0], np.int32)  # Not sorted by dataset: the reference misaligns.
  args = (mixed, emb, heads, target, weight, protos, table, closest)
  (_, a), _ = _loss(_cfg(css=False), *args)
  (_, b), _ = _loss(_cfg(css=False, compat=ReferenceCompat(cps_target_order=True)), *args)
  assert a["cps/cluster_heatmap"] != b["cps/cluster_heatmap"]
  # Sorted batches are unaffected by the flag.
  (_, c), _ = _loss(_cfg(css=False), *problem)
  (_, d), _ = _loss(_cfg(css=False, compat=ReferenceCompat(cps_target_order=True)), *problem)
  np.testing.assert_allclose(c["cps/cluster_heatmap"], d["cps/cluster_heatmap"], rtol=1e-6)


def test_ema_update_only_in_the_first_stage(problem):
  ds, emb, heads, target, weight, protos, table, closest = problem
  state = objective.PrototypeState(jnp.asarray(protos), jnp.asarray(table), jnp.asarray(closest))
  out = ModelOutputs(heatmaps=tuple(jnp.asarray(h) for h in heads), embedding=jnp.asarray(emb),
                     features=jnp.zeros((B, 1, 1, 1)))
  batch = dict(target=target, dataset_index=ds)
  for update in (True, False):
    cfg = _cfg(update_prototypes=update, cps=False, css=False, gumbel=True)
    _, _, new = jax.jit(lambda o, s: objective.posebh_objective(o, batch, weight, s,
                                                                jax.random.key(1), cfg))(out, state)
    assert np.array_equal(np.asarray(new), protos) != update


def test_baseline_has_no_prototype_terms(problem):
  ds, emb, heads, target, weight, protos, table, closest = problem
  cfg = dataclasses.replace(_cfg(), use_proto_head=False, cps=False, css=False)
  out = ModelOutputs(heatmaps=tuple(jnp.asarray(h) for h in heads), embedding=None,
                     features=jnp.zeros((B, 1, 1, 1)))
  state = objective.PrototypeState(jnp.asarray(protos), jnp.asarray(table), jnp.asarray(closest))
  total, metrics, new = objective.posebh_objective(out, dict(target=target, dataset_index=ds),
                                                   weight, state, jax.random.key(0), cfg)
  assert set(metrics) == {"loss/heatmap", "loss/heatmap_0", "loss/heatmap_1", "loss/total"}
  np.testing.assert_allclose(total, metrics["loss/heatmap"])
  np.testing.assert_array_equal(new, protos)
