"""transformers folders of the ViT families -> a Checkpoint: DINOv2 (with registers), CLIP, SigLIP, DeiT.

model_type (config.json) -> what is read:

- `dinov2` (`Dinov2Model`, `Dinov2ForImageClassification`: head over [class token, mean patch token]),
  `dinov2_with_registers` (and its classifier, whose mean patch token leaves the registers out): layer scale,
  SwiGLU (`mlp.weights_in/out`) for the giant; registers are converted to timm's layout (the class token absorbs
  its position embedding, the position embedding covers the patches only), as timm's DINOv2 filter does;
- `clip` (the full `CLIPModel`: its vision tower and `visual_projection`; the text tower is ignored),
  `clip_vision_model` (with or without projection): QuickGELU, a pre-norm, a patch projection without bias;
- `siglip` (`SiglipModel`, text ignored), `siglip_vision_model`, `SiglipForImageClassification` (head over the mean
  of the tokens): no class token, MAP head;
- `deit` (`DeiTModel`, `DeiTForImageClassification`: the class head only, `DeiTForImageClassificationWithTeacher`:
  the mean of the class and distillation heads).

The activation is the config's `hidden_act`. A folder is served at its processor's crop size (DINOv2's config
says 518, its processor crops 224): the position embedding is resampled as the library resamples it at run time
(bicubic, antialiased only for DINOv2 with registers).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from app.checkpoints.base import Checkpoint, CheckpointError
from app.checkpoints.files import read_json
from app.checkpoints.keys import config_from_shape, fuse_qkv, infer_shape
from app.model.twists import ACTIVATIONS

MODEL_TYPES = ("dinov2", "dinov2_with_registers", "clip", "clip_vision_model", "siglip", "siglip_vision_model", "deit")
REFUSED_TYPES = {
    "dinov3_vit": "rotary position embeddings (RoPE, DINOv3)",
    "eva": "rotary position embeddings (RoPE, EVA-02)",
    "beit": "relative position bias (BEiT)",
    "data2vec-vision": "relative position bias (data2vec)",
    "vit_hybrid": "a hybrid CNN stem (ViT-hybrid)",
    "dpt": "a hybrid CNN stem (DPT)",
}
TRUNKS = ("dinov2_with_registers.", "dinov2.", "deit.", "vision_model.")
IGNORED = re.compile(r"^(text_model\.|text_projection|logit_scale|logit_bias|pooler\.|embeddings\.mask_token$)")
TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "embeddings.patch_embedding": "patch_embed.proj",
    "pre_layrnorm": "norm_pre",  # sic, transformers' CLIP
    "layernorm": "norm",
    "post_layernorm": "norm",
    "classifier": "head",
    "cls_classifier": "head",
    "distillation_classifier": "head_dist",
    "visual_projection": "head",
    "head.layernorm": "attn_pool.norm",
    "head.attention.out_proj": "attn_pool.proj",
    "head.mlp.fc1": "attn_pool.mlp.fc1",
    "head.mlp.fc2": "attn_pool.mlp.fc2",
}
IN_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",  # DINOv2's SwiGLU: both halves packed, as timm packs them
    "mlp.weights_out": "mlp.fc2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
QKV = {
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
    "self_attn.q_proj": 0,
    "self_attn.k_proj": 1,
    "self_attn.v_proj": 2,
}
BLOCK = re.compile(r"^encoder\.(?:layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def is_family_config(config: dict) -> bool:
    return config.get("model_type") in MODEL_TYPES


def refused_type(model_type: str) -> str | None:
    return REFUSED_TYPES.get(model_type)


def convert_state_dict(hf: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """transformers' names -> ours; unknown keys keep their name, so strict loading names them."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, value in hf.items():
        name = next((key.removeprefix(t) for t in TRUNKS if key.startswith(t)), key)
        if IGNORED.match(name):
            continue
        module, _, param = name.rpartition(".")
        if name in TOP:
            out[TOP[name]] = value
        elif name == "embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif name == "embeddings.position_embedding.weight":
            out["pos_embed"] = value.unsqueeze(0)
        elif name == "head.probe":
            out["attn_pool.latent"] = value
        elif module == "head.attention" and param in ("in_proj_weight", "in_proj_bias"):
            dim = value.shape[0] // 3  # q, k, v stacked: our MAP head has q and a fused kv
            kind = param.removeprefix("in_proj_")
            out[f"attn_pool.q.{kind}"], out[f"attn_pool.kv.{kind}"] = value[:dim], value[dim:]
        elif module in TOP:
            out[f"{TOP[module]}.{param}"] = value
        elif (m := BLOCK.match(name)) and m.group(2) in ("layer_scale1", "layer_scale2"):
            out[f"blocks.{m.group(1)}.ls{m.group(2)[-1]}.gamma"] = value
        elif m and m.group(2) in IN_BLOCK:
            out[f"blocks.{m.group(1)}.{IN_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        elif m and m.group(2) in QKV:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[QKV[m.group(2)]] = value
        else:
            out[key] = value
    for (block, param), parts in sorted(qkv.items()):
        if len(parts) != 3:
            raise CheckpointError(f"{source}: block {block} has only some of the query/key/value {param}s")
        out[f"blocks.{block}.attn.qkv.{param}"] = fuse_qkv(parts[0], parts[1], parts[2])
    if "reg_token" in out:  # timm's layout: the class token carries its position, which covers patches only
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def build(
    hf_state_dict: dict[str, torch.Tensor],
    config: dict,
    preprocessor: dict | None,
    source: str,
    weights_path: Path,
) -> Checkpoint:
    from app.checkpoints.hf import _labels, preprocess_config  # the processor's steps are shared with plain ViTs

    model_type = config["model_type"]
    vision = config.get("vision_config") or {} if model_type in ("clip", "siglip") else config
    architectures = config.get("architectures") or []
    state_dict = convert_state_dict(hf_state_dict, source)
    shape = infer_shape(state_dict, source)
    act = vision.get("hidden_act", "quick_gelu" if model_type.startswith("clip") else "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (known: {', '.join(ACTIVATIONS)})")
    variations: dict = {"act": ACTIVATIONS[act], "family": model_type.removesuffix("_with_registers")}
    if model_type.startswith("clip"):
        variations["family"] = "clip"
        variations["projection"] = "visual_projection.weight" in hf_state_dict
    elif model_type.startswith("siglip"):
        variations["family"] = "siglip"
        if "SiglipForImageClassification" in architectures:
            variations["head_input"] = "mean"
    elif model_type == "deit":
        variations["family"] = "deit_distilled"
        variations["pool"] = "cls_dist"
        variations["head_input"] = "cls_dist" if "head_dist.weight" in state_dict else "cls"
    elif "head.weight" in state_dict:  # Dinov2ForImageClassification
        variations["head_input"] = "cls_mean"
    eps = float(vision.get("layer_norm_eps", 1e-6 if model_type.startswith(("dinov2", "siglip")) else 1e-5))
    if model_type == "deit":
        eps = float(vision.get("layer_norm_eps", 1e-12))
    heads = int(vision.get("num_attention_heads", 12))
    vit_config = config_from_shape(
        shape, source, num_heads=heads, qkv_bias=shape["qkv_bias"], layer_norm_eps=eps, **variations
    )
    preprocess = preprocess_config(preprocessor, vit_config.image_size, source)
    serve = preprocess.crop if preprocess.crop is not None else preprocess.resize
    serve_size = tuple(serve) if isinstance(serve, list | tuple) else (int(serve), int(serve))
    labels = [] if variations.get("projection") else _labels(config, vit_config)
    return Checkpoint(
        vit_config,
        state_dict,
        preprocess,
        "hf",
        source,
        weights_path,
        labels,
        pos_antialias=model_type == "dinov2_with_registers",
        serve_size=serve_size if serve_size != vit_config.image_size else None,
    )


def read_folder(folder: Path, source: str) -> Checkpoint:
    from app.checkpoints.hf import WEIGHT_FILES, _load_weights, _preprocessor_config

    config = read_json(folder / "config.json", source)
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{source}: {folder} has a config.json but none of {', '.join(WEIGHT_FILES)}")
    return build(_load_weights(weights, source), config, _preprocessor_config(folder, source), source, weights)
