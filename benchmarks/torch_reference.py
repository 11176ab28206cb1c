r"""A PyTorch port of the reference's PoseBH-B training step, for timing beside ours (issue 19).

Written from ../shared/spec/posebh_reference.md (§2–§3), not copied from the authors' code; it
does the reference's work the reference's way, so `benchmarks/train_step.py` can time both steps
in one process on the same batch and print `ratio reference/ours`:

* `ViTMoE` (§2.1): padded conv patch embedding, pos-embed with the "cls" slot added to every
  token, pre-norm blocks with DropPath, and the MoE MLP that runs EVERY expert on the whole batch
  and masks by dataset (the reference's DDP-friendly form).
* Six `TopdownHeatmapSimpleHead`s (§2.2: ConvTranspose2d k4 s2 p1 → BN → ReLU, twice, then 1×1)
  and the `KptProtoHead` embedding network (§2.3), every head on the whole batch.
* `KptPrototype` (§2.4–§2.5): |cos| similarity, per-dataset prototype learning with boolean
  indexing and a per-class Sinkhorn loop, PixelPrototypeCELoss (§2.6.3), the prototype heatmaps;
  cluster-prototype supervision (§2.6.4) and cross-type self-supervision (§2.6.5) with numpy
  DARK-UDP decoding (OpenCV blur) and numpy UDP pseudo targets, as the reference decodes on the
  host. Intended indexing (the paper's), like our default `ReferenceCompat()`.
* Layer-decay AdamW with global-norm clipping (§3.4), every parameter trained.

Never imported by the package: torch is the optional `[torch]` extra.
"""

from __future__ import annotations


import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Backbone (§2.1).
# ---------------------------------------------------------------------------------------------


class DropPath(nn.Module):
  """timm stochastic depth: per-sample Bernoulli keep mask, kept samples scaled by 1/keep."""

  def __init__(self, rate: float):
    super().__init__()
    self.rate = rate

  def forward(self, x):
    if not self.training or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x / keep * mask


class Attention(nn.Module):

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.scale = (dim // heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class MoEMlp(nn.Module):
  """fc1 → GELU → [fc2 (D − P channels) | expert_e (P channels)]; every expert runs, then masks."""

  def __init__(self, dim: int, hidden: int, part: int, experts: int):
    super().__init__()
    self.part = part
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim - part)
    self.experts = nn.ModuleList(nn.Linear(hidden, part) for _ in range(experts))

  def forward(self, x, dataset_index):
    h = self.act(self.fc1(x))
    shared = self.fc2(h)
    idx = dataset_index.view(-1, 1, 1)
    expert = torch.zeros_like(x[..., -self.part:])
    for i, layer in enumerate(self.experts):
      expert = expert + layer(h) * (idx == i)
    return torch.cat([shared, expert], dim=-1)


class Block(nn.Module):

  def __init__(self, dim, heads, mlp_ratio, part, experts, drop_path):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.drop_path = DropPath(drop_path)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = MoEMlp(dim, int(dim * mlp_ratio), part, experts)

  def forward(self, x, dataset_index):
    x = x + self.drop_path(self.attn(self.norm1(x)))
    return x + self.drop_path(self.mlp(self.norm2(x), dataset_index))


class ViTMoE(nn.Module):
  """`[B, 3, 256, 192]` → `[B, D, 16, 12]`."""

  def __init__(self, img_size=(256, 192), patch=16, padding=2, dim=768, depth=12, heads=12,
               mlp_ratio=4.0, part=192, experts=6, drop_path_rate=0.3):
    super().__init__()
    self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch, padding=padding)
    self.grid = tuple((s + 2 * padding - patch) // patch + 1 for s in img_size)
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid[0] * self.grid[1], dim) * 0.02)
    rates = np.linspace(0.0, drop_path_rate, depth)
    self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, part, experts, float(r))
                                for r in rates)
    self.last_norm = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x, dataset_index):
    x = self.patch_embed(x)
    b, c, hp, wp = x.shape
    x = x.flatten(2).transpose(1, 2) + self.pos_embed[:, 1:] + self.pos_embed[:, :1]
    for blk in self.blocks:
      x = blk(x, dataset_index)
    return self.last_norm(x).transpose(1, 2).reshape(b, c, hp, wp)


# ---------------------------------------------------------------------------------------------
# Heads (§2.2, §2.3).
# ---------------------------------------------------------------------------------------------


def _deconvs(in_ch: int, filters=(256, 256)) -> nn.Sequential:
  layers = []
  for f in filters:
    layers += [nn.ConvTranspose2d(in_ch, f, 4, stride=2, padding=1, output_padding=0, bias=False),
               nn.BatchNorm2d(f), nn.ReLU(inplace=True)]
    in_ch = f
  return nn.Sequential(*layers)


class HeatmapHead(nn.Module):

  def __init__(self, in_ch: int, keypoints: int):
    super().__init__()
    self.deconv_layers = _deconvs(in_ch)
    self.final_layer = nn.Conv2d(256, keypoints, 1)

  def forward(self, x):
    return self.final_layer(self.deconv_layers(x))


class ResBlock(nn.Module):

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.silu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.silu(y + self.downsample(x))


class ProtoHead(nn.Module):
  """Deconvs → 'res' neck → conv3×3, BN, SiLU, conv1×1: `[B, D, 16, 12]` → `[B, 64, 64, 48]`."""

  def __init__(self, in_ch: int, channels: int = 64, out_channels: int = 64):
    super().__init__()
    self.deconv_layers = _deconvs(in_ch)
    self.neck = ResBlock(256, channels)
    self.head = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                              nn.BatchNorm2d(channels), nn.SiLU(),
                              nn.Conv2d(channels, out_channels, 1))

  def forward(self, x):
    return self.head(self.neck(self.deconv_layers(x)))


# ---------------------------------------------------------------------------------------------
# Prototypes (§2.4, §2.5) and PixelPrototypeCELoss (§2.6.3).
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn(init_q, epsilon=0.05, iterations=3):
  """`distributed_sinkhorn` on one class's `[n_k, M]` similarities → Q `[n_k, M]`."""
  q = torch.exp((init_q - init_q.max()) / epsilon).t()  # [M, n_k]
  q /= q.sum()
  m, n = q.shape
  for _ in range(iterations):
    q /= q.sum(dim=1, keepdim=True)
    q /= m
    q /= q.sum(dim=0, keepdim=True)
    q /= n
  return (q * n).t()


class KptPrototype(nn.Module):
  """Prototype table `[Kc, M, E]` (not a parameter) over datasets of `num_keypoints` classes."""

  def __init__(self, num_keypoints, m=3, dim=64, gamma=0.999, prototypes=None):
    super().__init__()
    self.num_keypoints = list(num_keypoints)
    self.offsets = np.concatenate([[0], np.cumsum(num_keypoints)[:-1]]).astype(int)
    kc = int(sum(num_keypoints))
    self.m, self.gamma = m, gamma
    if prototypes is None:
      prototypes = F.normalize(torch.fmod(torch.randn(kc, m, dim), 2) * 0.02, dim=-1)
    self.register_buffer("prototypes", prototypes.clone())
    self.freeze = False

  def similarity(self, feats):
    """→ (normalised f `[N, E]`, |cos| `[N, Kc·M]`), re-normalising the table first."""
    f = F.normalize(feats, dim=1)
    with torch.no_grad():
      self.prototypes.data.copy_(F.normalize(self.prototypes, dim=-1))  # In place, as the reference.
    return f, (f @ self.prototypes.view(-1, self.prototypes.shape[-1]).t()).abs()

  def heatmap(self, emb):
    """Prototype heatmap `clip(max_m |cos|)`: `[B, E, H, W]` → `[B, Kc, H, W]`."""
    b, e, h, w = emb.shape
    _, s = self.similarity(emb.permute(0, 2, 3, 1).reshape(-1, e))
    cls = s.view(s.shape[0], -1, self.m).max(dim=-1)[0].clamp(1e-4, 1 - 1e-4)
    return cls.view(b, h, w, -1).permute(0, 3, 1, 2)

  def learn(self, feats, gt, conf, d):
    """Training path (§2.5, intended indices): → (logits `[N, K_d·M]`, target `[N]`)."""
    f, s = self.similarity(feats)
    sd, kd, m = int(self.offsets[d]), self.num_keypoints[d], self.m
    s3 = s.detach().view(s.shape[0], -1, m)  # [N, Kc, M]
    pred = s3.max(dim=-1)[0].argmax(dim=1)
    conf = conf.clone()
    conf[(gt + sd) != pred] = 0
    logits = s[:, sd * m:(sd + kd) * m]
    target = torch.full_like(gt, -1)
    protos = self.prototypes.clone()
    for k in range(kd):
      sel = gt == k
      if not sel.any():
        continue
      q = sinkhorn(s3[sel, sd + k, :])
      idx = q.argmax(dim=1)
      hard = F.gumbel_softmax(q, tau=0.5, hard=True)
      w = conf[sel]
      m_q, c_q = hard * w[:, None], f.detach()[sel] * w[:, None]
      upd, cnt = m_q.t() @ c_q, m_q.sum(0)
      valid = cnt != 0
      if cnt.sum() > 0:
        upd = F.normalize(upd, dim=-1)
        row = protos[sd + k]
        row[valid] = self.gamma * row[valid] + (1 - self.gamma) * upd[valid]
      target[sel] = idx + m * k
    if not self.freeze:
      self.prototypes.data.copy_(F.normalize(protos, dim=-1))
    return logits, target


def ppce(logits, target, weight=1.25e-5, ppc_weight=0.01, ppd_weight=0.001):
  """PixelPrototypeCELoss: `weight · (ppc_weight · CE + ppd_weight · mean (1 − logit_t)²)`."""
  ppc = F.cross_entropy(logits, target)
  ppd = (1 - logits.gather(1, target[:, None])).pow(2).mean()
  return weight * (ppc_weight * ppc + ppd_weight * ppd)


def joints_mse(pred, target, weight):
  """JointsMSELoss with target weights: `Σ w²(pred − gt)² / (K·N·H·W)`."""
  w = weight[:, :, None, None]
  return ((pred * w - target * w) ** 2).mean()


def hm_sample(emb, hm, thr=0.0):
  """Pixels whose target maximum exceeds `thr`: (embeddings `[n, E]`, class, conf)."""
  e = emb.shape[1]
  hmax, cls = hm.max(dim=1)
  keep = hmax.reshape(-1) > thr
  return emb.permute(0, 2, 3, 1).reshape(-1, e)[keep], cls.reshape(-1)[keep], \
      hmax.reshape(-1)[keep]


# ---------------------------------------------------------------------------------------------
# CSS decoding and pseudo targets, on the host in numpy (§2.6.5 steps 5–7, §5.3).
# ---------------------------------------------------------------------------------------------


def _max_preds(hm):
  """`[n, h, w]` → integer (x, y) `[n, 2]`, maxima `[n]` (−1 coordinates where max ≤ 0)."""
  n, h, w = hm.shape
  flat = hm.reshape(n, -1)
  idx, maxval = flat.argmax(1), flat.max(1)
  coords = np.stack([idx % w, idx // w], 1).astype(np.float32)
  coords[maxval <= 0] = -1
  return coords, maxval


def _dark_udp(coords, hm, kernel=11):
  """DARK-UDP refinement (§5.3 step 2) of `[n, 2]` coordinates on `[n, h, w]` heatmaps."""
  n, h, w = hm.shape
  hm = np.stack([cv2.GaussianBlur(x, (kernel, kernel), 0) for x in hm])
  hm = np.log(np.clip(hm, 0.001, 50))
  hm = np.pad(hm, ((0, 0), (1, 1), (1, 1)), mode="edge").reshape(n, -1)
  x, y = coords[:, 0] + 1, coords[:, 1] + 1
  i = (x + y * (w + 2)).astype(int) + np.arange(n) * (w + 2) * (h + 2)
  flat = hm.reshape(-1)
  at = lambda off: flat[np.clip(i + off, 0, flat.size - 1)]  # noqa: E731
  c, ix1, ix1_, iy1, iy1_ = at(0), at(1), at(-1), at(w + 2), at(-(w + 2))
  ix1y1, ix1_y1_ = at(w + 3), at(-(w + 3))
  dx, dy = 0.5 * (ix1 - ix1_), 0.5 * (iy1 - iy1_)
  dxx, dyy = ix1 - 2 * c + ix1_, iy1 - 2 * c + iy1_
  dxy = 0.5 * (ix1y1 - ix1 - iy1 + 2 * c - ix1_ - iy1_ + ix1_y1_)
  hess = np.stack([dxx, dxy, dxy, dyy], 1).reshape(n, 2, 2) + np.eye(2) * np.finfo(np.float32).eps
  return coords - (np.linalg.inv(hess) @ np.stack([dx, dy], 1)[..., None])[..., 0]


def _udp_target(xy, h, w, sigma=2.0):
  """UDP Gaussians `[n, h, w]` at heatmap-pixel coordinates `[n, 2]` (stride 1, §4.4 step 7)."""
  r = int(3 * sigma)
  out = np.zeros((len(xy), h, w), np.float32)
  size = 2 * r + 1
  for j, (x, y) in enumerate(xy):
    mu_x, mu_y = int(x + 0.5), int(y + 0.5)
    ul, br = (mu_x - r, mu_y - r), (mu_x + r + 1, mu_y + r + 1)
    if ul[0] >= w or ul[1] >= h or br[0] < 0 or br[1] < 0:
      continue
    gx = np.arange(size, dtype=np.float32)[None, :] - r - (x - mu_x)
    gy = np.arange(size, dtype=np.float32)[:, None] - r - (y - mu_y)
    g = np.exp(-(gx ** 2 + gy ** 2) / (2 * sigma ** 2))
    g_x, g_y = (max(0, -ul[0]), min(br[0], w) - ul[0]), (max(0, -ul[1]), min(br[1], h) - ul[1])
    i_x, i_y = (max(0, ul[0]), min(br[0], w)), (max(0, ul[1]), min(br[1], h))
    out[j, i_y[0]:i_y[1], i_x[0]:i_x[1]] = g[g_y[0]:g_y[1], g_x[0]:g_x[1]]
  return out


# ---------------------------------------------------------------------------------------------
# The model, its objective (§2.6) and the optimizer (§3.4).
# ---------------------------------------------------------------------------------------------


class PoseBH(nn.Module):
  """ViTMoE + six heatmap heads (+ the prototype head, tables and stage-2 losses)."""

  def __init__(self, num_keypoints=(17, 14, 16, 17, 17, 133), proto: bool = True,
               num_clusters: int = 96, dim=768, depth=12, heads=12, part=192,
               drop_path_rate=0.3):
    super().__init__()
    self.num_keypoints = list(num_keypoints)
    self.backbone = ViTMoE(dim=dim, depth=depth, heads=heads, part=part,
                           experts=len(num_keypoints), drop_path_rate=drop_path_rate)
    self.heads = nn.ModuleList(HeatmapHead(dim, k) for k in num_keypoints)
    self.proto = proto
    if proto:
      self.proto_head = ProtoHead(dim)
      self.kpt_prototype = KptPrototype(num_keypoints)
      self.kpt_prototype.freeze = True  # Stage 2: prototypes frozen (§3.2).
      j = sum(num_keypoints)
      # CPS table (§3.3 step 6): each cluster's closest keypoint; clusters spread over J.
      self.closest = np.round(np.linspace(0, j - 1, num_clusters)).astype(int)
      self.cluster_prototype = KptPrototype([num_clusters])
      self.cluster_prototype.freeze = True

  def loss(self, img, target, target_weight, ds):
    """Total training loss of one stage-2 step (or the multi-head loss without `proto`)."""
    feats = self.backbone(img, ds)
    hms, ts, ws = [], [], []
    total = 0.0
    for d, (head, k) in enumerate(zip(self.heads, self.num_keypoints)):
      out = head(feats)
      own = (ds == d).float()
      t_d, w_d = target[:, :k] * own[:, None, None, None], target_weight[:, :k] * own[:, None]
      total = total + joints_mse(out, t_d, w_d)
      hms.append(out)
      ts.append(t_d)
      ws.append(w_d)
    if not self.proto:
      return total
    # Every parameter trains in this step, so the prototype, CPS and CSS gradients reach the
    # backbone through the prototype head, as in the reference whenever its backbone is thawed
    # (and as ours by default: `model.proto.detach_backbone=False`).
    z = self.proto_head(feats).float()
    kp = self.kpt_prototype
    phm = kp.heatmap(z)  # [B, 214, 64, 48]
    offs = kp.offsets
    for d, k in enumerate(self.num_keypoints):  # §2.6.3
      sel = ds == d
      if not sel.any():
        continue
      emb, cls, conf = hm_sample(z[sel], ts[d][sel])
      if emb.shape[0] == 0:
        continue
      logits, tgt = kp.learn(emb, cls, conf, d)
      total = total + ppce(logits, tgt)
      total = total + 3.33e-6 * joints_mse(phm[sel][:, offs[d]:offs[d] + k], ts[d][sel],
                                           ws[d][sel])
    total = total + self._cps(z, ts, ws, ds)
    return total + self._css(z, hms, phm, ds)

  def _cps(self, z, ts, ws, ds):
    """Cluster-prototype supervision (§2.6.4)."""
    cp = self.cluster_prototype
    c = len(self.closest)
    chm = cp.heatmap(z)
    embs, clss, confs, tcs, wcs = [], [], [], [], []
    for d, k in enumerate(self.num_keypoints):
      sel = ds == d
      if not sel.any():
        continue
      s = self.kpt_prototype.offsets[d]
      cst = np.nonzero((self.closest >= s) & (self.closest < s + k))[0]
      kpt = torch.as_tensor(self.closest[cst] - s)
      cst = torch.as_tensor(cst)
      n = int(sel.sum())
      tc = z.new_zeros((n, c) + ts[d].shape[2:])
      wc = z.new_zeros((n, c))
      tc[:, cst] = ts[d][sel][:, kpt]
      wc[:, cst] = ws[d][sel][:, kpt]
      e, cl, cf = hm_sample(z[sel], tc)
      embs.append(e)
      clss.append(cl)
      confs.append(cf)
      tcs.append(tc)
      wcs.append(wc)
    loss_pc = 0.0
    emb = torch.cat(embs)
    if emb.shape[0]:
      logits, tgt = cp.learn(emb, torch.cat(clss), torch.cat(confs), 0)
      loss_pc = ppce(logits, tgt)
    loss_ch = joints_mse(chm, torch.cat(tcs), torch.cat(wcs))
    return 0.01 * (loss_pc + 3.33e-6 * loss_ch)

  def _css(self, z, hms, phm, ds, conf_thr=0.25, match_dist=2.1):
    """Cross-type self-supervision (§2.6.5, intended distance and pseudo keypoint)."""
    kp = self.kpt_prototype
    total = 0.0
    for d, k in enumerate(self.num_keypoints):
      neg = ds != d
      if not neg.any():
        continue
      h_pred = hms[d][neg]
      g_pred = phm[neg][:, kp.offsets[d]:kp.offsets[d] + k]
      with torch.no_grad():
        hd, gd = h_pred.detach(), g_pred.detach()
        conf = (hd.amax((2, 3)) > conf_thr) & (gd.amax((2, 3)) > conf_thr)
        hx, hy = hd.amax(2).argmax(-1), hd.amax(3).argmax(-1)
        gx, gy = gd.amax(2).argmax(-1), gd.amax(3).argmax(-1)
        dist = ((hx - gx) ** 2 + (hy - gy) ** 2).float().sqrt()
        keep = conf & (dist <= match_dist)
        inst = keep.any(1)
      if not inst.any():
        continue
      keep_i = keep[inst].cpu().numpy()
      hh, hw = hd.shape[2:]
      pairs = np.nonzero(keep_i)
      h_np = hd[inst].cpu().numpy()[pairs]
      g_np = gd[inst].cpu().numpy()[pairs]
      p_h, c_h = _max_preds(h_np)
      p_g, c_g = _max_preds(g_np)
      p_h, p_g = _dark_udp(p_h, h_np), _dark_udp(p_g, g_np)
      s = np.maximum(c_h + c_g, 1e-4)
      pseudo = (c_h / s)[:, None] * p_h + (c_g / s)[:, None] * p_g
      t_css = np.zeros((len(keep_i), k, hh, hw), np.float32)
      w_css = np.zeros((len(keep_i), k), np.float32)
      t_css[pairs] = _udp_target(pseudo, hh, hw)
      w_css[pairs] = np.minimum(c_h, c_g)
      t_css, w_css = torch.from_numpy(t_css), torch.from_numpy(w_css)
      emb, cls, cf = hm_sample(z[neg][inst], t_css * w_css[:, :, None, None])
      if emb.shape[0] == 0:
        continue
      hm = joints_mse(h_pred[inst], t_css, w_css)
      ph = 3.33e-6 * joints_mse(g_pred[inst], t_css, w_css)
      logits, tgt = kp.learn(emb, cls, cf, d)
      total = total + hm + ph + ppce(logits, tgt)
    return 1e-3 * total


def layer_decay_adamw(model: PoseBH, lr=1e-3, weight_decay=0.1, rate=0.75) -> torch.optim.AdamW:
  """§3.4: per-parameter groups, lr × rate^(L − 1 − layer id), no decay on 1-D/bias/pos_embed."""
  depth = len(model.backbone.blocks)
  num_layers = depth + 2
  groups = []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    if name.startswith(("backbone.pos_embed", "backbone.patch_embed")):
      layer = 0
    elif name.startswith("backbone.blocks."):
      layer = int(name.split(".")[2]) + 1
    else:
      layer = num_layers - 1
    no_decay = p.ndim == 1 or name.endswith(".bias") or "pos_embed" in name
    groups.append({"params": [p], "lr": lr * rate ** (num_layers - 1 - layer),
                   "weight_decay": 0.0 if no_decay else weight_decay})
  return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


def make_step(model: PoseBH, clip_norm: float = 1.0):
  """→ `step(img, target, target_weight, ds)`: forward, backward, clip, AdamW update; → loss."""
  opt = layer_decay_adamw(model)
  params = [p for p in model.parameters() if p.requires_grad]
  model.train()

  def step(img, target, target_weight, ds):
    loss = model.loss(img, target, target_weight, ds)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip_norm)
    opt.step()
    return float(loss.detach())

  return step


def normal_init_heads(model: PoseBH) -> None:
  """mmpose head init (§2.2/§2.3): convs and deconvs normal(0, 0.001), biases 0, BN 1/0."""
  heads = list(model.heads) + ([model.proto_head] if model.proto else [])
  for head in heads:
    for mod in head.modules():
      if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(mod.weight, std=0.001)
        if mod.bias is not None:
          nn.init.zeros_(mod.bias)
  for mod in model.backbone.modules():
    if isinstance(mod, nn.Linear):
      nn.init.trunc_normal_(mod.weight, std=0.02)
      nn.init.zeros_(mod.bias)


def build(proto: bool, size: str = "b", **kw) -> PoseBH:
  """PoseBH-B (`size='b'`) or a small model for a smoke run (`size='tiny'`)."""
  if size == "tiny":
    kw = dict(dim=96, depth=2, heads=3, part=24, drop_path_rate=0.0, **kw)
  elif size != "b":
    raise ValueError(f"the PyTorch reference port has sizes 'b' and 'tiny', not {size!r}")
  model = PoseBH(proto=proto, **kw)
  normal_init_heads(model)
  return model
