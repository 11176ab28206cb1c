"""Network modules: ViTMoE backbone, heatmap / prototype heads, and the full PoseBH model."""

from posebh_jax.models.heads import HeatmapHead, ProtoHead, ProtoHeadConfig, ResBlock
from posebh_jax.models.posebh import ModelOutputs, PoseBHModel, tiny_reference_model
from posebh_jax.models.vit_moe import ViTMoE, ViTMoEConfig

__all__ = [
    "HeatmapHead", "ModelOutputs", "PoseBHModel", "ProtoHead", "ProtoHeadConfig", "ResBlock",
    "ViTMoE", "ViTMoEConfig", "tiny_reference_model",
]
