"""Write app/data/torchvision_weights.json and app/data/imagenet_labels.json from torchvision itself.

torchvision is not a run-time dependency, so what it publishes is copied once into data files:

- torchvision_weights.json: "architectures": vit_b_16 ... -> the shape our ViT needs (read from the model
  built on the meta device); "weights": "arch.enum_name" -> the image size the weights were trained at and
  the eval transform of `ViT_*_Weights.<enum>.transforms()` (resize, crop, interpolation, mean, std), with the
  architecture's DEFAULT marked;
- imagenet_labels.json: the 1000 ImageNet-1k class names, `ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"]`.

Usage: python scripts/make_torchvision_table.py [--out-dir app/data]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torchvision
from torchvision import models

OUT_DIR = Path(__file__).resolve().parent.parent / "app" / "data"
WEIGHTS = {
    "vit_b_16": models.ViT_B_16_Weights,
    "vit_b_32": models.ViT_B_32_Weights,
    "vit_l_16": models.ViT_L_16_Weights,
    "vit_l_32": models.ViT_L_32_Weights,
    "vit_h_14": models.ViT_H_14_Weights,
}


def architecture(name: str) -> dict:
    with torch.device("meta"):
        m = getattr(models, name)()
    layer = m.encoder.layers[0]
    return {
        "embed_dim": m.hidden_dim,
        "depth": len(m.encoder.layers),
        "num_heads": layer.self_attention.num_heads,
        "patch_size": m.patch_size,
        "image_size": m.image_size,
        "mlp_dim": m.mlp_dim,
        "layer_norm_eps": m.encoder.ln.eps,
    }


def weight_set(weights, default) -> dict:
    t = weights.transforms()
    (crop,), (resize,) = t.crop_size, t.resize_size
    return {
        "enum": f"{type(weights).__name__}.{weights.name}",
        "image_size": weights.meta["min_size"][0],
        "resize": resize,
        "crop": crop,
        "interpolation": t.interpolation.value,
        "mean": list(t.mean),
        "std": list(t.std),
        "num_classes": len(weights.meta["categories"]),
        "default": weights is default,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    table = {"torchvision_version": torchvision.__version__, "architectures": {}, "weights": {}}
    for arch, enum in WEIGHTS.items():
        table["architectures"][arch] = architecture(arch)
        for w in enum:
            table["weights"][f"{arch}.{w.name.lower()}"] = weight_set(w, enum.DEFAULT)
    (args.out_dir / "torchvision_weights.json").write_text(json.dumps(table, indent=1) + "\n")
    labels = models.ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"]
    (args.out_dir / "imagenet_labels.json").write_text(json.dumps(labels, indent=0) + "\n")
    print(f"{args.out_dir}: {len(table['weights'])} torchvision weight sets, {len(labels)} ImageNet labels")


if __name__ == "__main__":
    main()
