"""Prototype learning (Sinkhorn targets + EMA) and PixelPrototypeCELoss.

Checked against (1) the reference's golden vectors, (2) a literal numpy port of the reference's
per-class loop, (3) the meaning of each reference-compat flag, (4) masking / freezing / Gumbel /
jit / gradient properties, (5) independence of the device mesh.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_golden
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from posebh_jax.objective import prototype_learning as pl
from posebh_jax.objective.compat import ReferenceCompat

M = 3
INTENDED = ReferenceCompat()
# The three prototype-learning defects of the reference (spec §6.3–6.5), all on.
AS_IMPLEMENTED = ReferenceCompat(proto_logit_offset=True, sinkhorn_local_column=True,
                                 correct_mask_local=True)
FLAGS = ("proto_logit_offset", "sinkhorn_local_column", "correct_mask_local")


def _offsets(nkp):
  return tuple(int(x) for x in np.cumsum((0,) + tuple(nkp[:-1])))


def _normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------
# A literal numpy port of the reference (KptPrototype.forward / prototype_learning /
# distributed_sinkhorn / PixelPrototypeCELoss), one dataset per call, boolean indexing, the
# deterministic argmax in place of Gumbel-softmax (as the golden's monkeypatch does). float64.
# --------------------------------------------------------------------------------------------


def _ref_sinkhorn(out, iterations=3, epsilon=0.05):
  lmat = np.exp(out / epsilon).T  # [M, n]
  b, k = lmat.shape[1], lmat.shape[0]
  lmat = lmat / lmat.sum()
  for _ in range(iterations):
    lmat = lmat / lmat.sum(axis=1, keepdims=True)
    lmat = lmat / k
    lmat = lmat / lmat.sum(axis=0, keepdims=True)
    lmat = lmat / b
  lmat = (lmat * b).T
  idx = np.argmax(lmat, axis=1)
  return np.eye(lmat.shape[1])[idx], idx


def _ref_call(feats, protos, gt, conf, d, nkp, *, as_implemented, gamma=0.999):
  """One `KptPrototype.forward(feats, gt, conf, dataset_idx=d)` in train mode.

  Returns (logits [n, K_d·M], target [n], prototypes after [J, M, E]).
  """
  feats = feats.astype(np.float64)
  f = _normalize(feats)
  p = _normalize(protos.astype(np.float64))
  s = np.abs(np.einsum("nd,kmd->nmk", f, p))  # [n, M, J]
  out_cls = s.max(axis=1)
  sflat = np.abs(f @ p.reshape(-1, p.shape[-1]).T)
  pred = np.argmax(out_cls, axis=1)
  s_d = sum(nkp[:d])
  mask = (gt == pred) if as_implemented else (s_d + gt == pred)
  conf = np.where(mask, conf, 0.0)
  target = np.full(gt.shape, -1)
  new = p.copy()
  start = s_d if as_implemented else s_d * M
  logits = sflat[:, start:start + nkp[d] * M]
  for k in range(nkp[d]):
    sel = gt == k
    if not sel.any():
      continue
    init_q = s[sel][:, :, k if as_implemented else s_d + k]
    q, idx = _ref_sinkhorn(init_q)
    m_q = q * conf[sel][:, None]
    c_q = f[sel] * conf[sel][:, None]
    fk = m_q.T @ c_q
    n = m_q.sum(axis=0)
    valid_n = n != 0
    if n.sum() > 0:
      fk = _normalize(fk)
      new[s_d + k, valid_n] = gamma * new[s_d + k, valid_n] + (1 - gamma) * fk[valid_n]
    target[sel] = idx + M * k
  return logits, target, _normalize(new)


def _ref_ppce(logits, target):
  """(PPC, PPD) before weights: CE with uniform class weights and mean (1 − logit_t)²."""
  mx = logits.max(axis=1, keepdims=True)
  lse = np.log(np.exp(logits - mx).sum(axis=1)) + mx[:, 0]
  lt = logits[np.arange(len(target)), target]
  return np.mean(lse - lt), np.mean((1 - lt) ** 2)


# --------------------------------------------------------------------------------------------
# Random multi-dataset pixel sets.
# --------------------------------------------------------------------------------------------

NKP = (5, 4, 6)  # Three datasets: s = (0, 5, 9), J = 15.
OFF = _offsets(NKP)


def _pixels(seed, protos, nkp=NKP, n=240, empty=((0, 3), (2, 1)), invalid_frac=0.15):
  """Mixed pixels: near their own class's prototype (intended mask passes), near global row k
  for d > 0 (the reference's local-vs-global mask passes), or pure noise; some invalid pixels,
  some classes (`empty`: (d, k) pairs) without any valid pixel.
  """
  rs = np.random.RandomState(seed)
  offs = _offsets(nkp)
  dim = protos.shape[-1]
  dataset = rs.randint(0, len(nkp), n)
  local = np.array([rs.randint(0, nkp[d]) for d in dataset])
  kind = rs.choice(3, n, p=[0.5, 0.25, 0.25])
  feats = rs.randn(n, dim)
  for i in range(n):
    row = offs[dataset[i]] + local[i] if kind[i] == 0 else local[i]
    if kind[i] != 2:
      feats[i] = 2 * protos[row, rs.randint(M)] + 0.12 * rs.randn(dim)
  conf = rs.uniform(0.1, 1.0, n)
  valid = rs.uniform(size=n) > invalid_frac
  for d, k in empty:
    valid[(dataset == d) & (local == k)] = False
  return dict(features=feats.astype(np.float32), local_class=local.astype(np.int32),
              dataset=dataset.astype(np.int32), conf=conf.astype(np.float32), valid=valid)


def _protos(seed, j=sum(NKP), dim=24):
  return _normalize(np.random.RandomState(seed).randn(j, M, dim)).astype(np.float32)


# Jitted once per static configuration: op-by-op eager dispatch would dominate the test time.
_prototype_learning = jax.jit(
    pl.prototype_learning,
    static_argnames=("offsets", "num_keypoints", "gamma", "epsilon", "iterations", "update",
                     "compat"))
_flat_similarity = jax.jit(pl.flat_similarity)
_ppce_loss = jax.jit(pl.ppce_loss, static_argnames=("num_datasets",))


def _learn(px, protos, *, nkp=NKP, compat=INTENDED, **kw):
  return _prototype_learning(px["features"], protos, px["local_class"], px["dataset"],
                             px["conf"], px["valid"], offsets=_offsets(nkp),
                             num_keypoints=nkp, compat=compat, **kw)


def _weighted_ppce(ppc, ppd):
  """The objective's PixelPrototypeCE weighting with the reference's weights."""
  return 1.25e-5 * (0.01 * ppc + 0.001 * ppd)


def _losses(px, protos, res, num_datasets=len(NKP)):
  sim = _flat_similarity(px["features"], protos)
  return _ppce_loss(sim, res.target, res.window_start, res.window_width, px["valid"],
                    px["dataset"], num_datasets=num_datasets)


def _assert_same(a, b):
  for name, x, y in zip(pl.ProtoLearnResult._fields, a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


# --------------------------------------------------------------------------------------------
# 1. Golden vectors.
# --------------------------------------------------------------------------------------------


def test_golden_inference_kpt_class():
  g = load_golden("proto.npz")
  nkp = tuple(int(x) for x in g["numk"])
  off = _offsets(nkp)
  sim = _flat_similarity(g["feats_inf"], g["prototypes"])
  kpt_class = np.clip(pl.class_similarity(sim, M), 1e-4, 1 - 1e-4)
  np.testing.assert_allclose(kpt_class, g["kpt_class_all"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(kpt_class[:, off[2]:off[2] + nkp[2]], g["kpt_class_ds2"],
                             rtol=0, atol=1e-5)


def test_golden_training_calls():
  g = load_golden("proto.npz")
  nkp = tuple(int(x) for x in g["numk"])
  off = _offsets(nkp)
  before = g["train_ds0_before"]
  # The golden's ds2 call shows the reference's indexing: all three flags on. For dataset 0
  # (s_0 = 0) both modes must agree exactly.
  calls = (("train_ds0_", (INTENDED, AS_IMPLEMENTED)),
           ("train2_ds0_uw0p5_", (INTENDED, AS_IMPLEMENTED)),
           ("train_ds2_", (AS_IMPLEMENTED,)))
  for prefix, modes in calls:
    feats, gt, conf = g[prefix + "feats"], g[prefix + "gt"], g[prefix + "conf"]
    d = int(g[prefix + "dataset_idx"])
    n = feats.shape[0]
    px = dict(features=feats, local_class=gt.astype(np.int32), dataset=np.full(n, d, np.int32),
              conf=conf, valid=np.ones(n, bool))
    results = []
    for compat in modes:
      res = _learn(px, before, nkp=nkp, compat=compat, gumbel_rng=None)
      sim = _flat_similarity(feats, before)
      ws = int(res.window_start[0])
      np.testing.assert_array_equal(res.window_start, ws)  # One dataset: one window.
      logits = sim[:, ws:ws + nkp[d] * M]
      kpt_class = np.clip(pl.class_similarity(sim, M)[:, off[d]:off[d] + nkp[d]], 1e-4, 1 - 1e-4)
      ppc, ppd = _ppce_loss(sim, res.target, res.window_start, res.window_width, px["valid"],
                            px["dataset"], num_datasets=len(nkp))
      loss = _weighted_ppce(ppc, ppd)
      err = f"{prefix} {compat}"
      np.testing.assert_allclose(logits, g[prefix + "logits"], rtol=0, atol=1e-5, err_msg=err)
      np.testing.assert_array_equal(res.target, g[prefix + "target"], err_msg=err)
      np.testing.assert_allclose(kpt_class, g[prefix + "kpt_class"], rtol=0, atol=1e-5,
                                 err_msg=err)
      if float(g[prefix + "update_weight"]) == 1.0:
        # The trainer's EMA (μ = γ); the golden's update_weight=0.5 call has a momentum the
        # reference's training never uses (spec §2.5: always 0.999), so only its targets and
        # losses are compared.
        np.testing.assert_allclose(res.prototypes, g[prefix + "after"], rtol=0, atol=1e-5,
                                   err_msg=err)
      np.testing.assert_allclose(ppc[d] * 0.01, g[prefix + "loss_ppc"], rtol=0, atol=1e-5)
      np.testing.assert_allclose(ppd[d] * 0.001, g[prefix + "loss_ppd"], rtol=0, atol=1e-5)
      np.testing.assert_allclose(loss[d], g[prefix + "loss"], rtol=1e-5, atol=1e-12)
      results.append(res)
    if len(results) == 2:
      _assert_same(*results)
    if prefix == "train_ds2_":  # The reference's mask rejects every pixel: no EMA step at all.
      assert not np.asarray(results[0].updated).any()
    else:
      assert np.asarray(results[0].updated).any()
    before = g[prefix + "after"]


# --------------------------------------------------------------------------------------------
# 2. The static formulation equals the reference's loop.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_implemented", [False, True])
def test_matches_reference_loop_dataset_by_dataset(as_implemented):
  """One dataset at a time, chained, exactly like the reference's per-dataset calls.

  The JAX call sees the whole mixed pixel set with `valid` restricted to dataset d, so this also
  checks that other datasets' pixels are fully masked out.
  """
  compat = AS_IMPLEMENTED if as_implemented else INTENDED
  protos = _protos(0)
  px = _pixels(1, protos)
  ref_p, jax_p = protos.astype(np.float64), protos
  for d in range(len(NKP)):
    sel = px["valid"] & (px["dataset"] == d)
    logits, target, ref_p_next = _ref_call(px["features"][sel], ref_p, px["local_class"][sel],
                                           px["conf"][sel], d, NKP,
                                           as_implemented=as_implemented)
    px_d = dict(px, valid=sel)
    res = _learn(px_d, jax_p, compat=compat)
    sim = np.asarray(_flat_similarity(px["features"], jax_p))[sel]
    ws, ww = int(res.window_start[sel][0]), NKP[d] * M
    np.testing.assert_allclose(sim[:, ws:ws + ww], logits, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.target)[sel], target)
    np.testing.assert_array_equal(np.asarray(res.target)[~sel], -1)
    np.testing.assert_allclose(res.prototypes, ref_p_next, rtol=0, atol=1e-5)
    ppc, ppd = _losses(px_d, jax_p, res)
    ref_ppc, ref_ppd = _ref_ppce(logits, target)
    np.testing.assert_allclose([ppc[d], ppd[d]], [ref_ppc, ref_ppd], rtol=1e-5)
    assert np.all(np.asarray(ppc)[np.arange(len(NKP)) != d] == 0)
    ref_p, jax_p = ref_p_next, np.asarray(res.prototypes)
  if not as_implemented:
    assert not np.allclose(jax_p, protos)  # The data did move prototypes of every dataset.


@pytest.mark.parametrize("as_implemented", [False, True])
def test_all_datasets_at_once_equals_reference_loop(as_implemented):
  """All datasets in one pass vs. the reference's dataset-after-dataset calls.

  They can only differ through the prototype state that later datasets see (the reference's
  dataset d sees the updates of datasets < d). With a table where each dataset's prototypes and
  pixels live in their own block of embedding dimensions, every pixel has |cos| = 0 exactly with
  the other datasets' prototypes before and after their updates, so both must agree. (In
  reference mode the blocks make the local-column Sinkhorn input and foreign logit columns 0 for
  d > 0, which is still what both sides compute.)
  """
  compat = AS_IMPLEMENTED if as_implemented else INTENDED
  blk = 8
  dim = blk * len(NKP)
  rs = np.random.RandomState(2)
  protos = np.zeros((sum(NKP), M, dim), np.float32)
  for d, (s, k) in enumerate(zip(OFF, NKP)):
    protos[s:s + k, :, d * blk:(d + 1) * blk] = rs.randn(k, M, blk)
  protos = _normalize(protos).astype(np.float32)
  px = _pixels(3, protos)
  for d in range(len(NKP)):  # Move the noise pixels into their dataset's block too.
    sel = px["dataset"] == d
    keep = np.zeros(dim, bool)
    keep[d * blk:(d + 1) * blk] = True
    px["features"][np.ix_(sel, ~keep)] = 0.0

  res = _learn(px, protos, compat=compat)
  ppc, ppd = _losses(px, protos, res)
  ref_p = protos.astype(np.float64)
  for d in range(len(NKP)):
    sel = px["valid"] & (px["dataset"] == d)
    logits, target, ref_p_next = _ref_call(px["features"][sel], ref_p, px["local_class"][sel],
                                           px["conf"][sel], d, NKP,
                                           as_implemented=as_implemented)
    np.testing.assert_array_equal(np.asarray(res.target)[sel], target)
    np.testing.assert_allclose([ppc[d], ppd[d]], _ref_ppce(logits, target), rtol=1e-5)
    ref_p = ref_p_next
  np.testing.assert_allclose(res.prototypes, ref_p, rtol=0, atol=1e-5)
  assert np.asarray(res.updated).any()


# --------------------------------------------------------------------------------------------
# 3. Each reference-compat flag does exactly its own thing, and only for datasets > 0.
# --------------------------------------------------------------------------------------------


def _flag(name):
  return ReferenceCompat(**{name: True})


@pytest.mark.parametrize("flag", FLAGS)
def test_compat_flag_has_no_effect_on_dataset_0(flag):
  protos = _protos(4)
  px = _pixels(5, protos)
  px["dataset"][:] = 0
  px["local_class"] %= NKP[0]
  _assert_same(_learn(px, protos), _learn(px, protos, compat=_flag(flag)))


def test_compat_proto_logit_offset_moves_only_the_window():
  protos = _protos(6)
  px = _pixels(7, protos)
  a, b = _learn(px, protos), _learn(px, protos, compat=_flag("proto_logit_offset"))
  off = np.asarray(OFF)[px["dataset"]]
  np.testing.assert_array_equal(a.window_start, off * M)
  np.testing.assert_array_equal(b.window_start, off)
  for name in ("prototypes", "target", "conf", "assignment", "window_width"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
  (ppc_a, ppd_a), (ppc_b, ppd_b) = _losses(px, protos, a), _losses(px, protos, b)
  assert ppc_a[0] == ppc_b[0] and ppd_a[0] == ppd_b[0]
  assert np.all(np.asarray(ppc_a[1:]) != np.asarray(ppc_b[1:]))


def test_compat_sinkhorn_local_column_uses_row_k():
  protos = _protos(8)
  px = _pixels(9, protos)
  a, b = _learn(px, protos), _learn(px, protos, compat=_flag("sinkhorn_local_column"))
  ds0 = px["dataset"] == 0
  np.testing.assert_array_equal(np.asarray(a.target)[ds0], np.asarray(b.target)[ds0])
  assert np.any(np.asarray(a.target)[~ds0] != np.asarray(b.target)[~ds0])
  np.testing.assert_array_equal(a.conf, b.conf)
  np.testing.assert_array_equal(a.window_start, b.window_start)
  # Dataset 1's targets equal those of an intended call whose classes are the global rows k:
  # relabel dataset-1 pixels as dataset 0 (offset 0), same local class.
  sel = px["valid"] & (px["dataset"] == 1)
  px0 = dict(px, valid=sel, dataset=np.zeros_like(px["dataset"]))
  c = _learn(px0, protos)
  np.testing.assert_array_equal(np.asarray(b.target)[sel], np.asarray(c.target)[sel])


def test_compat_correct_mask_local_compares_local_class_with_global_argmax():
  protos = _protos(10)
  px = _pixels(11, protos)
  a, b = _learn(px, protos), _learn(px, protos, compat=_flag("correct_mask_local"))
  sim = _flat_similarity(px["features"], protos)
  pred = np.argmax(np.asarray(pl.class_similarity(sim, M)), axis=-1)
  glob = np.asarray(OFF)[px["dataset"]] + px["local_class"]
  v = px["valid"]
  np.testing.assert_array_equal(a.conf, np.where(v & (pred == glob), px["conf"], 0))
  np.testing.assert_array_equal(b.conf, np.where(v & (pred == px["local_class"]), px["conf"], 0))
  np.testing.assert_array_equal(a.target, b.target)
  # Dataset 0 rows get identical updates; for d > 0 the flag changes which pixels update.
  np.testing.assert_array_equal(np.asarray(a.prototypes)[:NKP[0]],
                                np.asarray(b.prototypes)[:NKP[0]])
  assert not np.array_equal(np.asarray(a.updated)[NKP[0]:], np.asarray(b.updated)[NKP[0]:])
  # Pixels of d > 0 that sit on their own class are rejected by the reference's mask, so with
  # only such pixels no prototype of d > 0 moves (the update still goes to row s_d + k).
  near_own = px["valid"] & (px["dataset"] > 0) & (pred == glob)
  only = dict(px, valid=near_own)
  a2, b2 = _learn(only, protos), _learn(only, protos, compat=_flag("correct_mask_local"))
  assert np.asarray(a2.updated).any()
  assert not np.asarray(b2.updated).any()
  np.testing.assert_array_equal(b2.prototypes, protos)


# --------------------------------------------------------------------------------------------
# 4. Masking, freezing, Gumbel, jit, gradients.
# --------------------------------------------------------------------------------------------


def test_update_false_returns_prototypes_bit_identical():
  protos = _protos(12)
  px = _pixels(13, protos)
  frozen, live = _learn(px, protos, update=False), _learn(px, protos)
  np.testing.assert_array_equal(frozen.prototypes, protos)
  assert not np.asarray(frozen.updated).any()
  np.testing.assert_array_equal(frozen.target, live.target)
  assert np.asarray(live.updated).any()


def test_invalid_pixels_have_no_effect():
  protos = _protos(14)
  px = _pixels(15, protos)
  inv = ~px["valid"]
  rs = np.random.RandomState(16)
  other = dict(px)
  other["features"] = np.where(inv[:, None], rs.randn(*px["features"].shape) * 5,
                               px["features"]).astype(np.float32)
  other["conf"] = np.where(inv, 1.0, px["conf"]).astype(np.float32)
  other["local_class"] = np.where(inv, 99, px["local_class"]).astype(np.int32)
  other["dataset"] = np.where(inv, (px["dataset"] + 1) % len(NKP), px["dataset"]).astype(np.int32)
  a, b = _learn(px, protos), _learn(other, protos)
  np.testing.assert_array_equal(a.prototypes, b.prototypes)
  np.testing.assert_array_equal(a.target, b.target)
  np.testing.assert_array_equal(a.conf, b.conf)
  np.testing.assert_array_equal(np.asarray(a.target)[inv], -1)
  np.testing.assert_array_equal(np.asarray(a.conf)[inv], 0)
  for x, y in zip(_losses(px, protos, a), _losses(other, protos, b)):
    np.testing.assert_array_equal(x, y)


def test_class_without_valid_pixels_keeps_its_prototypes():
  protos = _protos(17)
  px = _pixels(18, protos, empty=((0, 3), (2, 1)))
  res = _learn(px, protos)
  for d, k in ((0, 3), (2, 1)):
    row = OFF[d] + k
    assert not np.asarray(res.updated)[row].any()
    np.testing.assert_array_equal(np.asarray(res.prototypes)[row], protos[row])
  # Every prototype that did not move is bit-identical; the moved ones are unit vectors.
  upd = np.asarray(res.updated)
  np.testing.assert_array_equal(np.asarray(res.prototypes)[~upd], protos[~upd])
  np.testing.assert_allclose(np.linalg.norm(np.asarray(res.prototypes)[upd], axis=-1), 1.0,
                             rtol=1e-6)


def test_gumbel_assignment_is_seeded_and_random():
  protos = _protos(19)
  px = _pixels(20, protos)
  key = jax.random.key(0)
  g1, g2 = _learn(px, protos, gumbel_rng=key), _learn(px, protos, gumbel_rng=key)
  det = _learn(px, protos, gumbel_rng=None)
  _assert_same(g1, g2)
  v = px["valid"]
  assert np.any(np.asarray(g1.assignment)[v] != np.asarray(det.assignment)[v])
  np.testing.assert_array_equal(g1.target, det.target)  # The CE target is always the argmax.
  np.testing.assert_array_equal(np.asarray(det.assignment)[v], np.asarray(det.target)[v] % M)
  assert not np.array_equal(g1.prototypes, det.prototypes)


def _step(features, protos, local_class, dataset, conf, valid, rng, *, compat=INTENDED,
          update=True):
  """Learning + loss the way a train step uses them: one similarity for everything."""
  sim = pl.flat_similarity(features, protos)
  res = pl.prototype_learning(features, protos, local_class, dataset, conf, valid,
                              offsets=OFF, num_keypoints=NKP, gumbel_rng=rng, update=update,
                              compat=compat, sim_flat=sim)
  ppc, ppd = pl.ppce_loss(sim, res.target, res.window_start, res.window_width, valid, dataset,
                          len(NKP))
  return jnp.sum(_weighted_ppce(ppc, ppd)), res


_step_jit = jax.jit(_step, static_argnames=("compat", "update"))


def test_one_jitted_step_with_shared_similarity():
  """The train-step usage (one jit, `sim_flat` computed once and passed in) equals the pieces."""
  protos = _protos(21)
  px = _pixels(22, protos)
  key = jax.random.key(1)
  loss, res = _step_jit(px["features"], protos, px["local_class"], px["dataset"], px["conf"],
                        px["valid"], key)
  ref = _learn(px, protos, gumbel_rng=key)
  for name, x, y in zip(pl.ProtoLearnResult._fields, res, ref):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=name)
  ppc, ppd = _losses(px, protos, ref)
  np.testing.assert_allclose(loss, np.sum(_weighted_ppce(ppc, ppd)), rtol=1e-6)


def test_gradients_reach_features_not_prototypes():
  protos = jnp.asarray(_protos(23))
  px = _pixels(24, np.asarray(protos))
  probe = jnp.asarray(np.random.RandomState(25).randn(*protos.shape), jnp.float32)

  def outputs(f, p):  # [the PPCE loss, a probe of the returned prototypes]
    loss, res = _step(f, p, px["local_class"], px["dataset"], px["conf"], px["valid"], None)
    return jnp.stack([loss, jnp.sum(res.prototypes * probe)])

  (jf_loss, jf_proto), (jp_loss, jp_proto) = [
      np.asarray(x) for x in
      jax.jit(jax.jacrev(outputs, argnums=(0, 1)))(jnp.asarray(px["features"]), protos)]
  assert np.abs(jf_loss).sum() > 0  # The loss trains the embedding ...
  np.testing.assert_array_equal(jf_loss[~px["valid"]], 0.0)  # ... through valid pixels only.
  np.testing.assert_array_equal(jp_loss, 0.0)  # Prototypes are constants for the loss,
  np.testing.assert_array_equal(jf_proto, 0.0)  # and the EMA result is stop-gradient.
  np.testing.assert_array_equal(jp_proto, 0.0)


# --------------------------------------------------------------------------------------------
# 5. The result does not depend on the device mesh.
# --------------------------------------------------------------------------------------------


def test_sharded_pixels_match_single_device():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.fail(f"expected 8 simulated devices (conftest), got {len(devices)}")
  protos = _protos(26)
  px = _pixels(27, protos)  # 240 pixels: 30 per device.
  rng = jax.random.key(3)  # The Gumbel draw must not depend on the sharding either.
  pix = (px["features"], px["local_class"], px["dataset"], px["conf"], px["valid"])
  loss1, res1 = _step_jit(pix[0], protos, *pix[1:], rng)
  assert len(res1.target.sharding.device_set) == 1

  mesh = Mesh(np.array(devices[:8]), ("data",))
  sharded = [jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))
             for x in pix]
  protos_r = jax.device_put(protos, NamedSharding(mesh, P()))
  loss8, res8 = _step_jit(sharded[0], protos_r, *sharded[1:], rng)
  assert len(res8.target.sharding.device_set) == 8

  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  np.testing.assert_array_equal(res8.target, res1.target)
  np.testing.assert_array_equal(res8.assignment, res1.assignment)
  np.testing.assert_array_equal(res8.updated, res1.updated)
  np.testing.assert_allclose(res8.prototypes, res1.prototypes, rtol=0, atol=1e-6)


@pytest.mark.parametrize("compat", [INTENDED, _flag("proto_logit_offset")])
def test_one_pass_ppce_equals_separate_calls_values_and_gradients(compat):
  """`ppce_loss_by_dataset` (one exp, one window-sum product for T calls) equals T `ppce_loss`
  calls with `prototype_learning`'s per-pixel windows: the losses and d loss / d sim."""
  protos = _protos(21)
  px = _pixels(22, protos)
  sim = _flat_similarity(px["features"], protos)
  calls = []
  main = _learn(px, protos, compat=compat)
  calls.append((main, px["valid"], px["dataset"]))
  rs = np.random.RandomState(23)
  for d in range(len(NKP)):  # CSS-like calls: every pixel in dataset d's window.
    px_d = dict(px, dataset=np.full_like(px["dataset"], d),
                local_class=rs.randint(0, NKP[d], len(px["dataset"])).astype(np.int32),
                valid=rs.uniform(size=len(px["dataset"])) > 0.5)
    calls.append((_learn(px_d, protos, compat=compat, update=False), px_d["valid"],
                  px_d["dataset"]))
  start, width = pl.dataset_windows(OFF, NKP, M, compat)
  weights = jnp.asarray(np.random.RandomState(24).uniform(0.5, 2.0, (2, len(calls), len(NKP))),
                        jnp.float32)

  def separate(s):
    out = [pl.ppce_loss(s, r.target, r.window_start, r.window_width, v, ds, len(NKP))
           for r, v, ds in calls]
    return jnp.stack([jnp.stack([c[0] for c in out]), jnp.stack([c[1] for c in out])])

  def one_pass(s):
    stack = lambda i: jnp.stack([jnp.asarray(c[i] if i else c[0].target) for c in calls])
    ppc, ppd = pl.ppce_loss_by_dataset(s, stack(0), stack(1), stack(2), window_start=start,
                                       window_width=width)
    return jnp.stack([ppc, ppd])

  want, got = separate(sim), one_pass(sim)
  # Every dataset of the main call, and each CSS-like call's own dataset, has pixels.
  assert np.all(want[0, 0] > 0) and all(want[0, 1 + d, d] > 0 for d in range(len(NKP)))
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
  g_want = jax.grad(lambda s: jnp.sum(separate(s) * weights))(sim)
  g_got = jax.grad(lambda s: jnp.sum(one_pass(s) * weights))(sim)
  np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-8)


def test_class_similarity_equals_jnp_max_with_its_derivative_ties_included():
  """The strided-slice class maximum and its written-out derivative are `jnp.max` over
  `[N, J, M]` and its derivative, bit for bit, including 2- and 3-way ties."""
  rng = np.random.default_rng(4)
  n, j, m = 50, 7, 3
  sim = rng.random((n, j * m)).astype(np.float32)
  sim[:10, 1::3] = sim[:10, 0::3]  # 2-way ties.
  sim[10:20, 1::3] = sim[10:20, 0::3]  # 3-way ties.
  sim[10:20, 2::3] = sim[10:20, 0::3]
  cot = rng.standard_normal((n, j)).astype(np.float32)

  def reference(s):
    return jnp.max(s.reshape(n, j, m), axis=-1)

  np.testing.assert_array_equal(pl.class_similarity(sim, m), reference(sim))
  grad = jax.grad(lambda s: jnp.sum(pl.class_similarity(s, m) * cot))(jnp.asarray(sim))
  want = jax.grad(lambda s: jnp.sum(reference(s) * cot))(jnp.asarray(sim))
  np.testing.assert_array_equal(grad, want)
  # A 3-way tie gives each entry a third of the cotangent.
  np.testing.assert_allclose(np.asarray(want)[10:20, 0:3],
                             np.repeat(cot[10:20, :1] / 3, 3, axis=1), rtol=1e-6)
