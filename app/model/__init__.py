from app.model.vit import (
    Attention,
    Block,
    Features,
    PatchEmbed,
    VisionTransformer,
    ViTConfig,
    grid_from_num_patches,
    resample_pos_embed,
)

__all__ = [
    "Attention",
    "Block",
    "Features",
    "PatchEmbed",
    "ViTConfig",
    "VisionTransformer",
    "grid_from_num_patches",
    "resample_pos_embed",
]
