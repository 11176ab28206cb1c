"""Cluster prototypes for cluster-prototype supervision, CPS (spec §3.3, §2.6.4).

At the start of the CPS stage (epoch 50) the frozen keypoint prototypes `P [J, M, E]` are
clustered into C cluster prototypes `[C, M, E]` by soft k-means with cosine distance; each
cluster is linked to the keypoint of its nearest prototype (`closest_keypoint`), and during CPS
a sample's cluster targets are the targets of those keypoints (`cluster_targets`). The cluster
heatmap `CHM [B, C, H, W]` needs no function of its own: it is
`prototypes.prototype_heatmap(embedding, cluster_prototypes)`.

Precision. The reference runs 500 float32 iterations that have not converged by then: for the
golden input the soft assignment of C=64 still moves by ~2.5e-4 per iteration at iteration 500
and a 1e-7 change of the starting centres grows ~400-fold. So float32 round-off of any
implementation other than torch's own (summation order, fused multiply-adds, exp) ends up as
1e-5..6e-5 in the assignment (3.3e-5 here for C=64). Iterating in float64 from the prototypes
normalised in float32, as the reference prepares them, follows the exact trajectory, which the
reference's float32 run stays within ~4e-6 of. (Normalising in float64 instead moves the start
by an ulp and the result by 1e-5: the float32 preparation matters.) `cluster_prototypes(...,
float64=True)` therefore does the iterations in float64 on the host CPU; the default is a
jittable float32 run of the same code.

Reference defects reproduced behind flags (`compat.ReferenceCompat`): `cps_topk_sort` (§6.6,
`compat_topk` here) and `cps_target_order` (§6.7, `compat_order` in `cluster_targets`). The
reference's cluster-count criterion (§3.3 step 5) is degenerate (§6.9): configs use a fixed C
(default 96, the reference's `cp_size`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from posebh_jax.objective.compat import ReferenceCompat
from posebh_jax.objective.prototypes import l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST  # No bf16/TF32 passes on TPU/GPU: cosines must be f32-exact.


@flax.struct.dataclass
class ClusterResult:
  """Output of `cluster_prototypes` (J keypoints, M in-class prototypes, C clusters, E dims).

  Attributes:
    prototypes: [C, M, E] float32 cluster prototypes; every row is one L2-normalised keypoint
      prototype (row 0 of cluster c is the one `closest_keypoint[c]` comes from).
    closest_keypoint: [C] int32 global keypoint id linked to each cluster.
    assign: [J*M, C] float32 soft assignment of every flattened prototype to every centre.
    centres: [C, E] float32 final k-means centres (not normalised, as in the reference).
  """
  prototypes: jax.Array
  closest_keypoint: jax.Array
  assign: jax.Array
  centres: jax.Array


def _check_num_clusters(num_keypoints: int, num_in_class: int, num_clusters: int) -> None:
  # The reference skips options C >= J; the initial centres X[i*M], i < C, need C <= J anyway.
  if num_clusters >= num_keypoints or num_clusters > num_keypoints * num_in_class:
    raise ValueError(f"num_clusters={num_clusters} must be < the number of keypoints "
                     f"{num_keypoints} (and <= {num_keypoints * num_in_class} prototypes)")
  if num_clusters < 1:
    raise ValueError(f"num_clusters={num_clusters} must be positive")


def _assignment(xs: jax.Array, centres: jax.Array, beta: float) -> tuple[jax.Array, jax.Array]:
  """Cosine distance `(1 − cos)/2` [N, C] and `softmax(−β·dist)` over centres [N, C]."""
  # torch's F.cosine_similarity normalises both operands before the dot product; `xs` is
  # normalised once by the caller, the centres (never renormalised themselves) here.
  cos = jnp.matmul(xs, l2_normalize(centres).T, precision=_HIGHEST)
  dist = (1.0 - cos) * 0.5
  return dist, jax.nn.softmax(-beta * dist, axis=1)


@functools.partial(jax.jit, static_argnames=("num_clusters", "iterations", "beta", "compat_topk",
                                             "dtype"))
def _cluster(prototypes: jax.Array, num_clusters: int, iterations: int, beta: float,
             compat_topk: bool, dtype: jnp.dtype) -> ClusterResult:
  """The whole of spec §3.3 steps 1–4; k-means iterations in `dtype`, outputs float32."""
  num_kpts, num_in_class, dim = prototypes.shape
  # Prepared in float32 whatever `dtype` is, as the reference does: the hook's F.normalize gives
  # X (also the rows of the cluster table), cosine_similarity normalises X once more. With the
  # trajectory's sensitivity these ulp-level details matter at the 1e-5 level (module docstring).
  x32 = l2_normalize(prototypes.astype(jnp.float32)).reshape(num_kpts * num_in_class, dim)
  x = x32.astype(dtype)
  xs = l2_normalize(x32).astype(dtype)
  init = x[jnp.arange(num_clusters) * num_in_class]  # First prototype of keypoints 0..C-1.

  def step(_, centres):
    _, a = _assignment(xs, centres, beta)
    # Weighted mean of the prototypes, not renormalised (the reference's update).
    return jnp.matmul(a.T, x, precision=_HIGHEST) / jnp.sum(a, axis=0)[:, None]

  centres = jax.lax.fori_loop(0, iterations, step, init)
  dist, assign = _assignment(xs, centres, beta)

  if compat_topk:
    # §6.6 as implemented: rank the centres for each of the first M prototypes; entry [c, m] is
    # the c-th nearest centre of flat prototype m, then used as a *prototype* index.
    top = jnp.argsort(dist[:num_in_class], axis=1, stable=True).T  # [C, M]
  else:
    # Intended: the M prototypes nearest to each centre.
    top = jnp.argsort(dist, axis=0, stable=True)[:num_in_class].T  # [C, M]
  return ClusterResult(
      prototypes=x32[top],
      closest_keypoint=(top[:, 0] // num_in_class).astype(jnp.int32),
      assign=assign.astype(jnp.float32),
      centres=centres.astype(jnp.float32))


def cluster_prototypes(
    prototypes: jax.Array,
    num_clusters: int,
    *,
    iterations: int = 500,
    beta: float = 20.0,
    compat_topk: bool = False,
    float64: bool = False,
) -> ClusterResult:
  """Clusters the keypoint prototypes into C cluster prototypes (spec §3.3 steps 1–4).

  X = the L2-normalised prototypes flattened to [J*M, E] (row k*M + m); the centres start at
  X[i*M] (i < C) and follow `iterations` soft k-means steps: `dist = (1 − cos(X, c))/2`,
  `A = softmax_c(−beta·dist)`, `c = Σ_x A X / Σ_x A`. With the final `dist`, cluster c takes the
  M prototypes nearest to its centre and is linked to the keypoint of the nearest one.

  Args:
    prototypes: [J, M, E] keypoint prototypes (normalised here).
    num_clusters: C, must be < J (the reference skips larger options).
    iterations: k-means steps (500 in the reference).
    beta: softmax sharpness (20 in the reference).
    compat_topk: reproduce spec §6.6: the "top-M" of cluster c are the c-th nearest centres of
      flat prototypes 0..M-1, used as prototype ids (`ReferenceCompat.cps_topk_sort`).
    float64: iterate in float64 on the host CPU (not traceable; ~0.5 s for C=96 after a ~1 s
      compile). Follows the exact trajectory, bitwise independent of accelerator and sharding,
      and matches the reference's assignment to ~4e-6 (float32 default: ~3e-5); meant for the
      one-off CPS initialisation. False: float32, jittable, runs where `prototypes` lives.

  Returns:
    `ClusterResult` (prototypes [C, M, E], closest_keypoint [C] int32, assign [J*M, C],
    centres [C, E]); all float32/int32.

  Raises:
    ValueError: `num_clusters` >= J, or `float64=True` under a jax transformation.
  """
  num_kpts, num_in_class, _ = prototypes.shape
  _check_num_clusters(num_kpts, num_in_class, num_clusters)
  kwargs = dict(num_clusters=num_clusters, iterations=iterations, beta=float(beta),
                compat_topk=compat_topk)
  if not float64:
    return _cluster(prototypes, dtype=jnp.float32, **kwargs)
  try:
    host = np.asarray(jax.device_get(prototypes), np.float32)
  except jax.errors.TracerArrayConversionError as e:
    raise ValueError("cluster_prototypes(float64=True) runs on the host: call it outside jit "
                     "(or use float64=False)") from e
  try:
    # This process's own CPU device: in a multi-process run jax.devices() lists every
    # process's devices, and a result on another process's device could not be fetched.
    cpu = jax.default_device(jax.local_devices(backend="cpu")[0])
  except RuntimeError:  # No CPU backend (JAX_PLATFORMS excludes it): the default device then.
    cpu = contextlib.nullcontext()
  with jax.enable_x64(True), cpu:
    out = jax.device_get(_cluster(jnp.asarray(host), dtype=jnp.float64, **kwargs))
  return jax.tree.map(jnp.asarray, out)


def cluster_keypoint_from_prototypes(
    cluster_protos: np.ndarray | jax.Array,
    keypoint_protos: np.ndarray | jax.Array,
    tol: float = 1e-5,
) -> np.ndarray | None:
  """Recovers `closest_keypoint` of a cluster table made by `cluster_prototypes` (host numpy).

  Row 0 of every cluster is one flattened, L2-normalised keypoint prototype in both top-M modes
  (its flat index f gives the keypoint f // M), so the link can be rebuilt from a checkpoint that
  stores only the two prototype tables (the reference keeps `closest_kpt` outside its state).

  Args:
    cluster_protos: [C, M, E] cluster prototypes.
    keypoint_protos: [J, M, E] keypoint prototypes they were clustered from (normalised here,
      as the clustering does; a checkpoint's table may be slightly off unit norm).
    tol: max abs difference for a row to count as that prototype.

  Returns:
    [C] int32 global keypoint ids, or None where some cluster's row 0 matches no keypoint
    prototype (e.g. the random placeholder table of a checkpoint saved before CPS).
  """
  kp = np.asarray(jax.device_get(keypoint_protos), np.float32)
  num_kpts, num_in_class, dim = kp.shape
  x = np.asarray(l2_normalize(jnp.asarray(kp))).reshape(num_kpts * num_in_class, dim)
  rows = np.asarray(jax.device_get(cluster_protos), np.float32)[:, 0]  # [C, E]
  diff = np.max(np.abs(rows[:, None, :] - x[None, :, :]), axis=-1)  # [C, J*M]
  flat = np.argmin(diff, axis=1)
  if np.any(diff[np.arange(len(rows)), flat] > tol):
    return None
  return (flat // num_in_class).astype(np.int32)


def cluster_targets(
    target: jax.Array,
    weight: jax.Array,
    dataset_index: jax.Array,
    closest_keypoint: jax.Array,
    *,
    offsets: tuple[int, ...],
    num_keypoints: tuple[int, ...],
    compat_order: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Per-sample cluster targets and weights for CPS (spec §2.6.4 step 2), static shapes.

  For a sample of dataset d (global keypoints `[s_d, s_d + K_d)`), cluster c gets the target and
  weight of local keypoint `closest_keypoint[c] − s_d` if that lies in `[0, K_d)`, else zeros
  (clusters linked to another dataset's keypoint, and all clusters while `closest_keypoint` is
  the −1 placeholder from before CPS).

  compat_order (spec §6.7, `ReferenceCompat.cps_target_order`): the reference builds these rows
  per dataset and concatenates the blocks in dataset order (datasets 0, 1, ...; within a block,
  batch order), while the predicted cluster heatmap stays in batch order, so row b of the
  targets generally belongs to another sample than row b of the prediction. Reproduced by
  permuting the rows with a stable sort of `dataset_index`, which yields exactly that
  concatenation (every sample belongs to one dataset, so the blocks fill all B rows).

  Args:
    target: [B, K_max, H, W] each sample's own-skeleton targets (zero beyond K_d).
    weight: [B, K_max] target weights.
    dataset_index: [B] int dataset of each sample.
    closest_keypoint: [C] int global keypoint id of each cluster.
    offsets: s_d, global id of each dataset's first keypoint.
    num_keypoints: K_d of each dataset.
    compat_order: reproduce the reference's dataset-order rows (above).

  Returns:
    (Tc [B, C, H, W], Wc [B, C]), in the dtypes of `target` and `weight`.
  """
  k_max = target.shape[1]
  start = jnp.asarray(offsets, jnp.int32)[dataset_index]  # [B]
  count = jnp.asarray(num_keypoints, jnp.int32)[dataset_index]  # [B]
  local = closest_keypoint.astype(jnp.int32)[None, :] - start[:, None]  # [B, C]
  valid = (local >= 0) & (local < count[:, None])
  local = jnp.clip(local, 0, k_max - 1)
  tc = jnp.take_along_axis(target, local[:, :, None, None], axis=1)
  tc = jnp.where(valid[:, :, None, None], tc, jnp.zeros((), target.dtype))
  wc = jnp.where(valid, jnp.take_along_axis(weight, local, axis=1), jnp.zeros((), weight.dtype))
  if compat_order:
    order = jnp.argsort(dataset_index, stable=True)
    tc, wc = tc[order], wc[order]
  return tc, wc


def init_clusters(prototypes: Any, num_clusters: int, *, iterations: int, beta: float,
                  compat: ReferenceCompat) -> tuple[np.ndarray, np.ndarray]:
  """Clusters the keypoint prototypes into the CPS table (spec §3.3). → ([C, M, E], [C]).

  Runs once per training, on the host in float64: 500 soft k-means iterations are not converged
  and amplify float32 rounding differences ~400-fold, so a float32 run would depend on the
  accelerator and the sharding (see `cluster_prototypes`). The float64 result matches
  the reference's goldens to 4e-6 and is identical on every host.
  """
  res = cluster_prototypes(np.asarray(jax.device_get(prototypes)), num_clusters,
                           iterations=iterations, beta=beta, compat_topk=compat.cps_topk_sort,
                           float64=True)
  return (np.asarray(res.prototypes, np.float32),
          np.asarray(res.closest_keypoint, np.int32))
