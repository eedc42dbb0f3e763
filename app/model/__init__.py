from app.model.vit import (
    Attention,
    Block,
    Features,
    PatchEmbed,
    VisionTransformer,
    ViTConfig,
    resample_pos_embed,
)

__all__ = [
    "Attention",
    "Block",
    "Features",
    "PatchEmbed",
    "ViTConfig",
    "VisionTransformer",
    "resample_pos_embed",
]
