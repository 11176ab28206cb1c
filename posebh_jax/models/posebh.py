"""The PoseBH network (spec §2): ViTMoE backbone, one heatmap head per dataset, prototype head.

Variables: `params` (float32) and `batch_stats` (BN running statistics) are separate
collections; DropPath draws from the `'droppath'` rng stream. Training::

  outputs, updates = model.apply({'params': p, 'batch_stats': bs}, images, ds_idx, train=True,
                                 rngs={'droppath': key}, mutable=['batch_stats'])

Param tree (mirrors the PyTorch state_dict, see `posebh_jax/convert/torch_to_flax.py`)::

  backbone/{patch_embed/proj, pos_embed, blocks_{i}/{norm1, attn/{qkv, proj}, norm2,
            mlp/{fc1, fc2, experts_kernel, experts_bias}}, last_norm}
  heads_{d}/{deconv_layers_{0,1,3,4}, final_layer}          (d = dataset index)
  proto_head/{deconv_layers_{0,1,3,4}, neck/{conv1, bn1, conv2, bn2, downsample_0,
              downsample_1}, head_{0,1,3}}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from posebh_jax.models.heads import HeatmapHead, ProtoHead, ProtoHeadConfig
from posebh_jax.models.vit_moe import ViTMoE, ViTMoEConfig

Dtype = Any


@flax.struct.dataclass
class ModelOutputs:
  """Outputs of `PoseBHModel`.

  Attributes:
    heatmaps: one entry per dataset head d, `[B, K_d, Hh, Wh]` float32; every head runs on the
      whole batch (its BN statistics mix all datasets, spec §2.6.2).
    embedding: prototype-head embedding `[B, Hh, Wh, E]` float32, or None without a proto head.
    features: backbone feature map `[B, Hp, Wp, D]` float32.
  """
  heatmaps: tuple[jax.Array, ...]
  embedding: jax.Array | None
  features: jax.Array


class PoseBHModel(nn.Module):
  """Multi-dataset top-down pose model (ViTPose++ + prototype head).

  Attributes:
    backbone: ViTMoE sizes (num_experts should equal len(num_keypoints)).
    num_keypoints: K_d of each dataset head, in dataset-index order
      ((17, 14, 16, 17, 17, 133) for COCO, AIC, MPII, AP-10K, APT-36K, COCO-WholeBody).
    head_deconv_filters: deconv channels of every heatmap head.
    head_deconv_kernels: deconv kernels of every heatmap head (default 4 each).
    head_final_kernel: final conv kernel of the heatmap heads.
    proto_head: prototype-head sizes.
    use_proto_head: build the prototype head (its `embedding` output is None otherwise).
    proto_detach_backbone: feed the prototype head `stop_gradient(features)`, so prototype
      losses train the prototype head only. An option, off by default: in the reference the
      prototype, CPS and CSS gradients reach the backbone whenever it is thawed (ViT-H's last
      epochs, and ViT-B's with the 6.8 fix), so detaching changes training there.
    dtype: compute dtype (float32 or bfloat16); params and all outputs are float32.
    bn_groups: the heads' BatchNorm statistics: 1 = over the whole global batch (SyncBN under
      GSPMD); G > 1 = per group of B / G consecutive rows, i.e. per device when G is the number
      of batch shards (`heads.GroupedBatchNorm`). A config value, so results do not depend on
      the device count.
  """
  backbone: ViTMoEConfig = ViTMoEConfig()
  num_keypoints: tuple[int, ...] = (17, 14, 16, 17, 17, 133)
  head_deconv_filters: tuple[int, ...] = (256, 256)
  head_deconv_kernels: tuple[int, ...] | None = None
  head_final_kernel: int = 1
  proto_head: ProtoHeadConfig = ProtoHeadConfig()
  use_proto_head: bool = True
  proto_detach_backbone: bool = False
  dtype: Dtype = jnp.float32
  bn_groups: int = 1

  @nn.compact
  def __call__(self, images: jax.Array, dataset_index: jax.Array, *,
               train: bool, frozen: tuple[str, ...] = ()) -> ModelOutputs:
    """Runs backbone, all heatmap heads and (optionally) the prototype head.

    Args:
      images: normalised crops `[B, H, W, 3]` float.
      dataset_index: `[B]` int, dataset of each sample (selects the MoE expert).
      train: DropPath on and BN in batch-statistics mode (pass `mutable=['batch_stats']`).
      frozen: parameter groups ("backbone", "heads", "proto_head") that run in eval mode even
        when `train`: a frozen module neither updates its BN statistics nor drops paths (spec
        §6.14; the reference keeps them in train mode, `reference_compat.frozen_train_mode`).

    Returns:
      `ModelOutputs`.
    """
    features = ViTMoE(self.backbone, dtype=self.dtype, name="backbone")(
        images, dataset_index, train=train and "backbone" not in frozen)
    # Head 0 (COCO) always computes in float32: the reference runs it with autocast off
    # (spec §2.6.2, §2.8); heads 1-5 use the compute dtype.
    heatmaps = tuple(
        HeatmapHead(k, self.head_deconv_filters, self.head_deconv_kernels,
                    self.head_final_kernel, dtype=jnp.float32 if d == 0 else self.dtype,
                    bn_groups=self.bn_groups,
                    name=f"heads_{d}")(features, train=train and "heads" not in frozen)
        for d, k in enumerate(self.num_keypoints))
    embedding = None
    if self.use_proto_head:
      proto_in = jax.lax.stop_gradient(features) if self.proto_detach_backbone else features
      embedding = ProtoHead(**dataclasses.asdict(self.proto_head), dtype=self.dtype,
                            bn_groups=self.bn_groups,
                            name="proto_head")(proto_in,
                                               train=train and "proto_head" not in frozen)
    return ModelOutputs(heatmaps=heatmaps, embedding=embedding, features=features)


def tiny_reference_model(**overrides: Any) -> PoseBHModel:
  """The tiny configuration of the golden `tiny_posebh.pth` (shared/golden/README.md)."""
  kwargs: dict[str, Any] = dict(
      backbone=ViTMoEConfig(img_size=(256, 192), patch_size=16, patch_padding=2, embed_dim=96,
                            depth=2, num_heads=3, mlp_ratio=4.0, part_features=24,
                            num_experts=6, drop_path_rate=0.0),
      num_keypoints=(17, 14, 16, 17, 17, 133),
      head_deconv_filters=(32, 32),
      head_deconv_kernels=(4, 4),
      proto_head=ProtoHeadConfig(deconv_filters=(32, 32), deconv_kernels=(4, 4), channels=16,
                                 out_channels=16, head_kernel=3),
      use_proto_head=True)
  kwargs.update(overrides)
  return PoseBHModel(**kwargs)
