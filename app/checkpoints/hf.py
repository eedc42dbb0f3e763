"""Hugging Face transformers ViT checkpoints -> our parameter names.

A folder as `save_pretrained` writes it (config.json with model_type "vit", model.safetensors or
pytorch_model.bin, possibly sharded, optional preprocessor_config.json), or a single state-dict file in
transformers' key naming with an optional config.json beside it.

Keys: `ViTForImageClassification` prefixes the trunk with `vit.` and adds `classifier.*`; `ViTModel` has
no prefix and an unused `pooler.*` (ignored, as is the masked-image-modelling `embeddings.mask_token`).
Both the names on the Hub (`encoder.layer.N.attention.attention.query`, ...) and transformers 5's in-memory
names (`layers.N.attention.q_proj`, ...) are read. Separate q, k, v projections become one fused qkv.

Preprocessing follows `ViTImageProcessor`: resize to `size` ({height, width} exactly, or the shortest edge),
optional centre crop (transformers floors the crop margin), rescale by 1/255, normalise; defaults 224 x 224,
bilinear, mean = std = 0.5. Without a preprocessor_config.json the model's own input size is used.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from app.checkpoints.base import Checkpoint, CheckpointError
from app.checkpoints.files import load_tensors, read_json
from app.checkpoints.keys import config_from_shape, fuse_qkv, infer_shape
from app.checkpoints.tables import heads_for_width, timm_table, torchvision_table
from app.model import ViTConfig
from app.preprocess import HALF, PreprocessConfig

LAYER_NORM_EPS = 1e-12  # transformers' ViTConfig default
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# PIL's integer resampling codes, as preprocessor_config.json stores them
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "layernorm": "norm",
    "classifier": "head",
}
IN_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
QKV = {
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}
HF_BLOCK = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
IGNORED = re.compile(r"^(?:vit\.)?(?:pooler\.|embeddings\.mask_token$)")


def is_hf_config(config: dict) -> bool:
    return config.get("model_type") == "vit"


def is_hf_state_dict(keys) -> bool:
    return any(k.removeprefix("vit.").startswith("embeddings.patch_embeddings.") for k in keys)


def read_folder(folder: Path, source: str) -> Checkpoint:
    """A save_pretrained folder."""
    config = read_json(folder / "config.json", source)
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{source}: {folder} has a config.json but none of {', '.join(WEIGHT_FILES)}")
    state_dict = _load_weights(weights, source)
    return build(state_dict, config, _preprocessor_config(folder, source), source, weights)


def read_file(
    path: Path, state_dict: dict[str, torch.Tensor], side_config: dict | None, source: str, arch: str | None = None
) -> Checkpoint:
    """A single state dict in transformers' naming; `side_config` is the config.json beside it, if any.

    Without a transformers config.json, `arch` (a timm or torchvision name) may supply the number of heads."""
    hf_config = side_config if side_config and is_hf_config(side_config) else None
    heads = None if hf_config else _heads_of_arch(arch, source)
    return build(state_dict, hf_config, _preprocessor_config(path.parent, source), source, path, heads)


def _heads_of_arch(arch: str | None, source: str) -> int | None:
    if not arch:
        return None
    name = arch.partition(".")[0]
    for table in (timm_table(), torchvision_table()):
        if name in table["architectures"]:
            return table["architectures"][name]["num_heads"]
    raise CheckpointError(f"{source}: unknown architecture {name!r} (a timm or torchvision ViT name)")


def build(
    hf_state_dict: dict[str, torch.Tensor],
    hf_config: dict | None,
    preprocessor: dict | None,
    source: str,
    weights_path: Path,
    num_heads: int | None = None,
) -> Checkpoint:
    state_dict = convert_state_dict(hf_state_dict, source)
    shape = infer_shape(state_dict, source)
    config = vit_config(hf_config, shape, source) if hf_config else _config_from_keys(shape, source, num_heads)
    preprocess = preprocess_config(preprocessor, config.image_size, source)
    return Checkpoint(config, state_dict, preprocess, "hf", source, weights_path, _labels(hf_config, config))


def convert_state_dict(hf: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """transformers' names -> ours. Keys it does not know keep their name, so strict loading names them."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[int, tuple[str, torch.Tensor]]] = {}
    for key, value in hf.items():
        if IGNORED.match(key):
            continue
        name = key.removeprefix("vit.")
        module, _, param = name.rpartition(".")
        if name in TOP:  # bare parameters: cls_token, position_embeddings
            out[TOP[name]] = value
            continue
        if module in TOP:
            out[f"{TOP[module]}.{param}"] = value
            continue
        m = HF_BLOCK.match(name)
        if m and m.group(2) in IN_BLOCK:
            out[f"blocks.{m.group(1)}.{IN_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        elif m and m.group(2) in QKV:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[QKV[m.group(2)]] = (key, value)
        else:
            out[key] = value  # unknown: strict loading will name it
    for (block, param), parts in sorted(qkv.items()):
        if len(parts) != 3:
            have = ", ".join(k for k, _ in parts.values())
            raise CheckpointError(f"{source}: block {block} has only some of the query/key/value {param}s ({have})")
        out[f"blocks.{block}.attn.qkv.{param}"] = fuse_qkv(*(parts[i][1] for i in range(3)))
    return out


def vit_config(hf: dict, shape: dict, source: str) -> ViTConfig:
    """Our ViTConfig from transformers' config.json (its defaults where a field is absent)."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(
            f"{source}: hidden_act {hf['hidden_act']!r} is not supported (vitserve's ViT uses the exact GELU, 'gelu')"
        )
    if hf.get("num_channels", 3) != 3:
        raise CheckpointError(f"{source}: num_channels {hf['num_channels']} is not supported (RGB images only)")
    patch = hf.get("patch_size", 16)
    if isinstance(patch, list | tuple):
        if patch[0] != patch[1]:
            raise CheckpointError(f"{source}: non-square patches {patch} are not supported")
        patch = patch[0]
    size = hf.get("image_size", 224)
    image_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return ViTConfig(
        image_size=image_size,
        patch_size=int(patch),
        embed_dim=int(hf.get("hidden_size", 768)),
        depth=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        mlp_dim=int(hf.get("intermediate_size", 3072)),
        num_classes=shape["num_classes"],  # ViTModel (no head) or ViTForImageClassification: the keys say
        qkv_bias=bool(hf.get("qkv_bias", True)),
        layer_norm_eps=float(hf.get("layer_norm_eps", LAYER_NORM_EPS)),
    )


def _config_from_keys(shape: dict, source: str, num_heads: int | None = None) -> ViTConfig:
    hint = "put the model's config.json beside the weights"
    num_heads = num_heads or heads_for_width(shape["embed_dim"], source, hint=hint)
    return config_from_shape(
        shape, source, num_heads=num_heads, qkv_bias=shape["qkv_bias"], layer_norm_eps=LAYER_NORM_EPS
    )


def _labels(hf_config: dict | None, config: ViTConfig) -> list[str]:
    id2label = (hf_config or {}).get("id2label") or {}
    try:
        labels = {int(i): str(name) for i, name in id2label.items()}
    except (TypeError, ValueError):
        return []
    if sorted(labels) != list(range(config.num_classes)):
        return []  # no labels, or labels that do not match the head: the engine falls back to class_<i>
    return [labels[i] for i in range(config.num_classes)]


def _load_weights(path: Path, source: str) -> dict[str, torch.Tensor]:
    if not path.name.endswith(".index.json"):
        return load_tensors(path, source)
    index = read_json(path, source)
    shards = sorted(set((index.get("weight_map") or {}).values()))
    if not shards:
        raise CheckpointError(f"{source}: {path.name} lists no weight shards")
    state_dict: dict[str, torch.Tensor] = {}
    for shard in shards:
        state_dict.update(load_tensors(path.parent / shard, source))
    return state_dict


def _preprocessor_config(folder: Path, source: str) -> dict | None:
    path = folder / "preprocessor_config.json"
    return read_json(path, source) if path.is_file() else None


def _size(value, what: str, source: str) -> dict:
    """transformers' size forms: an int (square), {"height", "width"} or {"shortest_edge"}."""
    if isinstance(value, int):
        return {"height": value, "width": value}
    if isinstance(value, dict) and (("height" in value and "width" in value) or "shortest_edge" in value):
        if value.get("longest_edge"):
            raise CheckpointError(f"{source}: preprocessor_config.json {what} with longest_edge is not supported")
        return value
    raise CheckpointError(f"{source}: preprocessor_config.json has an unsupported {what}: {value!r}")


def _interpolation(resample, source: str) -> str:
    if isinstance(resample, str) and resample.lower() in PIL_RESAMPLE.values():
        return resample.lower()
    if isinstance(resample, int) and resample in PIL_RESAMPLE:
        return PIL_RESAMPLE[resample]
    raise CheckpointError(f"{source}: preprocessor_config.json has an unknown resample {resample!r}")


def preprocess_config(pp: dict | None, image_size: tuple[int, int], source: str) -> PreprocessConfig:
    """ViTImageProcessor's steps from preprocessor_config.json (its defaults where a key is absent)."""
    if pp is None:  # no processor file: ViTImageProcessor's defaults at the model's own input size
        return PreprocessConfig(resize=tuple(image_size), interpolation="bilinear", mean=HALF, std=HALF)
    size = _size(pp.get("size", {"height": 224, "width": 224}), "size", source)
    crop = None
    if pp.get("do_center_crop", False):
        c = _size(pp.get("crop_size", {"height": 224, "width": 224}), "crop_size", source)
        if "height" not in c:
            raise CheckpointError(f"{source}: preprocessor_config.json crop_size needs height and width")
        crop = (int(c["height"]), int(c["width"]))
    if not pp.get("do_resize", True):
        # the processor would pass images through at their own size, which a ViT cannot take:
        # resize exactly to what the crop (or the model) expects instead
        resize = crop or tuple(image_size)
    elif "shortest_edge" in size:
        resize = int(size["shortest_edge"])
    else:
        resize = (int(size["height"]), int(size["width"]))
    if isinstance(resize, int) and crop is None:
        crop = tuple(image_size)  # a shortest-edge resize alone has no fixed size; centre-crop to the model's
    mean, std = _normalisation(pp, source)
    return PreprocessConfig(
        resize=resize,
        crop=crop,
        interpolation=_interpolation(pp.get("resample", 2), source),
        mean=mean,
        std=std,
        crop_rounding="floor",
    )


def _normalisation(pp: dict, source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for our x/255 pixels that give transformers' (x * rescale_factor - mean) / std."""
    mean = pp.get("image_mean", HALF) if pp.get("do_normalize", True) else (0.0, 0.0, 0.0)
    std = pp.get("image_std", HALF) if pp.get("do_normalize", True) else (1.0, 1.0, 1.0)
    mean = [float(m) for m in (mean if isinstance(mean, list | tuple) else [mean] * 3)]
    std = [float(s) for s in (std if isinstance(std, list | tuple) else [std] * 3)]
    if len(mean) != 3 or len(std) != 3:
        raise CheckpointError(f"{source}: preprocessor_config.json image_mean/image_std need 3 values")
    factor = float(pp.get("rescale_factor", 1 / 255)) if pp.get("do_rescale", True) else 1.0
    k = 255.0 * factor  # 1.0 for the usual rescale of 1/255
    return tuple(m / k for m in mean), tuple(s / k for s in std)
