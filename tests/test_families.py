"""The ViT families (DINOv2, CLIP, SigLIP, DeiT distilled, pooled ViTs) against their reference libraries.

Small random models are built by timm, transformers and open_clip themselves, every parameter perturbed (so that
zero-initialised layer scales, tokens or biases hide nothing), saved in each format, loaded with `app.load_model`
and compared in float32 on logits, default embeddings, tokens and attention maps.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import app
from app import analysis
from app.checkpoints import CheckpointError

ATOL, RTOL = 1e-4, 1e-3
SMALL = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours.float(), theirs.float(), atol=ATOL, rtol=RTOL)


def pixels(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


# -- timm ----------------------------------------------------------------------------------------------------


def timm_attentions(model, x) -> list[torch.Tensor]:
    """Each block's softmaxed attention, caught at its (identity) attention dropout on timm's unfused path; a
    parallel block's branches side by side along the heads."""
    caught, hooks = [], []
    for block in model.blocks:
        attns = [a.attn for a in block.attns] if hasattr(block, "attns") else [block.attn]
        caught.append([])
        for attn in attns:
            attn.fused_attn = False
            hook = attn.attn_drop.register_forward_hook(lambda m, i, o, maps=caught[-1]: maps.append(o.detach()))
            hooks.append(hook)
    with torch.no_grad():
        model.forward_features(x)
    for h in hooks:
        h.remove()
    return [torch.cat(maps, dim=1) for maps in caught]


def save_timm(tmp_path, name: str, model, model_args: dict):
    folder = tmp_path / name
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    config = {"architecture": name, "num_classes": model.num_classes, "model_args": model_args}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


TIMM = [
    ("vit_small_patch14_dinov2", {}, "dinov2", "cls", (1, 0, 0)),
    ("vit_small_patch14_reg4_dinov2", {}, "dinov2", "cls", (1, 0, 4)),
    ("vit_giant_patch14_dinov2", {"mlp_ratio": 4.0}, "dinov2", "cls", (1, 0, 0)),  # SwiGLU
    ("vit_base_patch16_clip_224", {}, "clip", "cls", (1, 0, 0)),
    ("vit_base_patch16_clip_quickgelu_224", {}, "clip", "cls", (1, 0, 0)),
    ("vit_base_patch16_siglip_224", {}, "siglip", "map", (0, 0, 0)),
    ("vit_base_patch16_siglip_gap_224", {}, "siglip", "mean", (0, 0, 0)),
    ("deit_tiny_distilled_patch16_224", {}, "deit_distilled", "cls", (1, 1, 0)),
    ("vit_medium_patch16_gap_256", {}, "vit_gap", "mean", (0, 0, 0)),
    ("vit_medium_patch16_reg4_gap_256", {}, "vit_gap", "mean", (0, 0, 4)),
    ("vit_so150m_patch16_reg4_map_256", {}, "vit", "map", (0, 0, 4)),
    ("vit_base_patch16_rpn_224", {}, "vit_gap", "mean", (0, 0, 0)),  # post-norm blocks
    ("vit_small_patch16_18x2_224", {}, "vit", "cls", (1, 0, 0)),  # parallel blocks
]


@pytest.mark.parametrize(("name", "extra", "family", "pool", "prefix"), TIMM, ids=[t[0] for t in TIMM])
def test_timm_family(tmp_path, name, extra, family, pool, prefix):
    timm = pytest.importorskip("timm")
    args = {**SMALL, **extra}
    ref = perturb(timm.create_model(name, pretrained=False, num_classes=5, **args))
    model_args = {k: v for k, v in args.items() if k != "img_size"}
    folder = save_timm(tmp_path, name, ref, model_args)
    model = app.load_model(str(folder))
    info = model.info
    assert (info["family"], info["pool"]) == (family, pool)
    assert info["prefix_tokens"] == dict(zip(("class", "distillation", "registers"), prefix, strict=True))
    x = pixels()
    out = model(x, attentions=True)
    with torch.no_grad():
        feats = ref.forward_features(x)
        close(out.tokens, feats)
        if info["num_classes"]:
            close(out.embedding, ref.forward_head(feats, pre_logits=True))
            close(out.logits, ref.forward_head(feats))
        else:  # a CLIP tag whose head is the image-text projection: it gives the embedding
            assert family == "clip" and out.logits is None
            close(out.embedding, ref.forward_head(feats))
    for ours, theirs in zip(out.attentions, timm_attentions(ref, x), strict=True):
        close(ours, theirs)
    assert info["embedding_dim"] == out.embedding.shape[1]


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_base_patch16_siglip_224"])
def test_timm_resampled(tmp_path, name):
    """At another image size the position embedding is resampled as timm resamples it."""
    timm = pytest.importorskip("timm")
    ref = perturb(timm.create_model(name, pretrained=False, num_classes=5, **SMALL))
    folder = save_timm(tmp_path, name, ref, {k: v for k, v in SMALL.items() if k != "img_size"})
    big = perturb(timm.create_model(name, pretrained=False, num_classes=5, **{**SMALL, "img_size": 48}))
    big.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(ref.state_dict(), big))
    model = app.load_model(str(folder), image_size=48)
    x = pixels(48)
    with torch.no_grad():
        close(model(x).logits, big(x))


# -- transformers --------------------------------------------------------------------------------------------

HF_SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def save_hf(tmp_path, name: str, model, crop: int = 32, mean=(0.5, 0.5, 0.5)):
    folder = tmp_path / name
    model.save_pretrained(folder)
    processor = {
        "do_resize": True,
        "size": {"shortest_edge": crop},
        "do_center_crop": True,
        "crop_size": {"height": crop, "width": crop},
        "resample": 3,
        "image_mean": list(mean),
        "image_std": [0.25, 0.25, 0.25],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def hf_model(cls, config):
    model = cls(config)
    model.set_attn_implementation("eager")
    return perturb(model)


def features(result) -> torch.Tensor:
    """get_image_features returns a tensor, or in recent transformers an output whose pooler_output it is."""
    return result if isinstance(result, torch.Tensor) else result.pooler_output


def check_hf(model, x, tokens, embedding, attentions, logits=None):
    out = model(x, attentions=True)
    close(out.tokens, tokens)
    close(out.embedding, embedding)
    for ours, theirs in zip(out.attentions, attentions, strict=True):
        close(ours, theirs)
    if logits is None:
        assert out.logits is None
    else:
        close(out.logits, logits)
    return out


@pytest.mark.parametrize("swiglu", [False, True])
def test_hf_dinov2(tmp_path, swiglu):
    """Served at the processor's crop (32) though config.json says 48: resampled as transformers does (no
    antialias); Dinov2ForImageClassification's head reads [class token, mean patch token]."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(**HF_SMALL, image_size=48, patch_size=8, use_swiglu_ffn=swiglu, num_labels=3)
    ref = hf_model(transformers.Dinov2ForImageClassification, config)
    model = app.load_model(str(save_hf(tmp_path, "dinov2", ref)))
    assert model.info["image_size"] == [32, 32] and model.info["family"] == "dinov2"
    x = pixels()
    with torch.no_grad():
        trunk = ref.dinov2(x, output_attentions=True)
        logits = ref(x).logits
    check_hf(model, x, trunk.last_hidden_state, trunk.pooler_output, trunk.attentions, logits)


@pytest.mark.parametrize("classifier", [False, True])
def test_hf_dinov2_with_registers(tmp_path, classifier):
    """Registers between the class token and the patches; resampled 6x6 -> 4x4 with antialias, as transformers'
    DINOv2 with registers does; the classifier reads [class token, mean patch token] (registers left out)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2WithRegistersConfig(
        **HF_SMALL, image_size=48, patch_size=8, num_register_tokens=4, num_labels=3
    )
    cls = (
        transformers.Dinov2WithRegistersForImageClassification if classifier else transformers.Dinov2WithRegistersModel
    )
    ref = hf_model(cls, config)
    model = app.load_model(str(save_hf(tmp_path, "dinov2reg", ref)))
    assert model.info["prefix_tokens"] == {"class": 1, "distillation": 0, "registers": 4}
    x = pixels()
    trunk = ref.dinov2_with_registers if classifier else ref
    with torch.no_grad():
        r = trunk(x, output_attentions=True)
        logits = ref(x).logits if classifier else None
    out = check_hf(model, x, r.last_hidden_state, r.pooler_output, r.attentions, logits)
    heat, method = model.attention_heatmap(out, "rollout")
    assert heat.shape == (2, 16) and method == "rollout"
    close(heat, analysis.rollout(out.attentions, prefix=5))
    close(model.pooled(out, "mean"), r.last_hidden_state[:, 5:].mean(dim=1))


def test_hf_clip(tmp_path):
    transformers = pytest.importorskip("transformers")
    vision = {**HF_SMALL, "image_size": 32, "patch_size": 8}
    config = transformers.CLIPConfig(vision_config=vision, text_config=TEXT, projection_dim=16)
    ref = hf_model(transformers.CLIPModel, config)
    model = app.load_model(str(save_hf(tmp_path, "clip", ref)))
    info = model.info
    assert (info["family"], info["embedding_dim"], info["num_classes"]) == ("clip", 16, 0)
    x = pixels()
    with torch.no_grad():
        v = ref.vision_model(x, output_attentions=True)
        embedding = features(ref.get_image_features(pixel_values=x))
        tokens = ref.vision_model.post_layernorm(v.last_hidden_state)
    out = check_hf(model, x, tokens, embedding, v.attentions)
    close(model.pooled(out, "cls"), v.pooler_output)
    close(model.pooled(out, "mean"), tokens[:, 1:].mean(dim=1))


def test_hf_clip_vision_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(**HF_SMALL, image_size=32, patch_size=8)
    ref = hf_model(transformers.CLIPVisionModel, config)
    model = app.load_model(str(save_hf(tmp_path, "clipv", ref)))
    x = pixels()
    with torch.no_grad():
        v = ref(x, output_attentions=True)
    post_layernorm = getattr(ref, "vision_model", ref).post_layernorm
    check_hf(model, x, post_layernorm(v.last_hidden_state), v.pooler_output, v.attentions)


@pytest.mark.parametrize("classifier", [False, True])
def test_hf_siglip(tmp_path, classifier):
    transformers = pytest.importorskip("transformers")
    vision = {**HF_SMALL, "image_size": 32, "patch_size": 8}
    config = transformers.SiglipConfig(vision_config=vision, text_config=TEXT, num_labels=3)
    cls = transformers.SiglipForImageClassification if classifier else transformers.SiglipModel
    ref = hf_model(cls, config)
    model = app.load_model(str(save_hf(tmp_path, "siglip", ref)))
    assert (model.info["family"], model.info["pool"]) == ("siglip", "map")
    x = pixels()
    with torch.no_grad():
        v = ref.vision_model(x, output_attentions=True)
        pooled = ref.vision_model.head(v.last_hidden_state)
        logits = ref(pixel_values=x).logits if classifier else None
    out = check_hf(model, x, v.last_hidden_state, pooled, v.attentions, logits)
    if not classifier:
        close(out.embedding, v.pooler_output)
    assert out.probe_attention.shape == (2, 2, 1, 16)
    with pytest.raises(ValueError, match="no class token"):
        model.pooled(out, "cls")


@pytest.mark.parametrize("teacher", [False, True])
def test_hf_deit(tmp_path, teacher):
    transformers = pytest.importorskip("transformers")
    config = transformers.DeiTConfig(**HF_SMALL, image_size=32, patch_size=8, num_labels=3)
    cls = transformers.DeiTForImageClassificationWithTeacher if teacher else transformers.DeiTForImageClassification
    ref = hf_model(cls, config)
    model = app.load_model(str(save_hf(tmp_path, "deit", ref)))
    assert model.info["prefix_tokens"] == {"class": 1, "distillation": 1, "registers": 0}
    x = pixels()
    with torch.no_grad():
        r = ref.deit(x, output_attentions=True)
        logits = ref(x).logits
    tokens = r.last_hidden_state
    check_hf(model, x, tokens, (tokens[:, 0] + tokens[:, 1]) / 2, r.attentions, logits)


# -- DINOv2's torch.hub state dicts, open_clip, refusals ---------------------------------------------------------


def test_dinov2_hub_state_dict(tmp_path):
    """A torch.hub DINOv2 with registers (register_tokens, mask_token, w12/w3 naming) against timm's conversion."""
    timm = pytest.importorskip("timm")
    args = {**SMALL, "img_size": 518, "patch_size": 14, "embed_dim": 384, "num_heads": 6}
    ref = perturb(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, **args))
    sd = ref.state_dict()
    hub = {k: v for k, v in sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    hub["cls_token"] = sd["cls_token"] - torch.zeros(1)  # hub: the class position lives in pos_embed
    hub["pos_embed"] = torch.cat([torch.zeros(1, 1, 384), sd["pos_embed"]], dim=1)
    hub["register_tokens"] = sd["reg_token"]
    hub["mask_token"] = torch.zeros(1, 384)
    torch.save(hub, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    model = app.load_model(str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"), image_size=56)
    assert model.info["family"] == "dinov2" and model.info["num_heads"] == 6
    ref56 = perturb(
        timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, **{**args, "img_size": 56})
    )
    ref56.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(dict(hub), ref56))
    x = pixels(56)
    with torch.no_grad():
        close(model(x).embedding, ref56(x))


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip(tmp_path, quick_gelu):
    open_clip = pytest.importorskip("open_clip")
    vision = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "ls_init_value": 0.5}
    text = {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    ref = perturb(open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    cfg = {"model_cfg": {"embed_dim": 16, "quick_gelu": quick_gelu, "vision_cfg": vision, "text_cfg": text}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    model = app.load_model(str(tmp_path / "open_clip_model.safetensors"))
    assert (model.info["family"], model.info["format"], model.info["embedding_dim"]) == ("clip", "open_clip", 16)
    x = pixels()
    with torch.no_grad():
        embedding = ref.encode_image(x)
        ref.visual.output_tokens = True
        pooled, patch_tokens = ref.visual(x)
    out = model(x)
    close(out.embedding, embedding)
    close(out.embedding, pooled)
    close(out.tokens[:, 1:], patch_tokens)


def test_torchscript_refused(tmp_path):
    module = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(module, str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(CheckpointError, match=r"TorchScript.*open_clip"):
        app.load_model(str(tmp_path / "ViT-B-16.pt"))


def test_rope_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov3_vit"}))
    with pytest.raises(CheckpointError, match="RoPE"):
        app.load_model(str(tmp_path))


def test_timm_architectures_load_or_are_refused_by_name():
    """Every timm vit_* / deit_* architecture either loads (its keys and shapes, strictly) or is refused with a
    CheckpointError naming the feature; scripts/count_timm_archs.py prints the reasons."""
    pytest.importorskip("timm")
    from scripts.count_timm_archs import count

    loaded, refused = count()
    assert len(loaded) >= 139, sorted(refused.items())
    assert "vit_giant_patch14_reg4_dinov2" in loaded and "vit_so400m_patch14_siglip_384" in loaded


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_resampled(tmp_path, family):
    """At another image size the position embedding is resampled as transformers interpolates it (bicubic,
    without antialias), against the library's own `interpolate_pos_encoding=True`."""
    transformers = pytest.importorskip("transformers")
    vision = {**HF_SMALL, "image_size": 32, "patch_size": 8}
    if family == "clip":
        ref = hf_model(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**vision))
    else:
        ref = hf_model(transformers.SiglipVisionModel, transformers.SiglipVisionConfig(**vision))
    model = app.load_model(str(save_hf(tmp_path, family, ref)), image_size=48)
    x = pixels(48)
    with torch.no_grad():
        r = ref(x, interpolate_pos_encoding=True)
    close(model(x).embedding, r.pooler_output)


def test_timm_clip_tags(tmp_path):
    """A timm CLIP tag fine-tuned on ImageNet (`_ft_`, this architecture's default) keeps its head as a classifier;
    a tag without `_ft_` (openai, laion2b, ...) makes the head the image-text projection of the default embedding."""
    timm = pytest.importorskip("timm")
    name = "vit_base_patch16_clip_224"
    ref = perturb(timm.create_model(name, pretrained=False, num_classes=5, **SMALL))
    folder = save_timm(tmp_path, name, ref, {k: v for k, v in SMALL.items() if k != "img_size"})
    x = pixels()
    with torch.no_grad():
        feats = ref.forward_features(x)
        logits, pre_logits = ref.forward_head(feats), ref.forward_head(feats, pre_logits=True)
    fine_tuned = app.load_model(str(folder))
    assert (fine_tuned.info["num_classes"], fine_tuned.info["embedding_dim"]) == (5, 64)
    close(fine_tuned(x).logits, logits)
    close(fine_tuned(x).embedding, pre_logits)
    config = json.loads((folder / "config.json").read_text())
    pretrained = {"tag": "openai", "input_size": [3, 32, 32], "crop_pct": 1.0, "interpolation": "bicubic"}
    pretrained |= {"mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 5}
    (folder / "config.json").write_text(json.dumps({**config, "pretrained_cfg": pretrained}))
    projected = app.load_model(str(folder))
    assert (projected.info["num_classes"], projected.info["embedding_dim"]) == (0, 5)
    assert projected(x).logits is None
    close(projected(x).embedding, logits)
    close(projected.pooled(projected(x), "cls"), pre_logits)


# -- the fast paths: the CPU runner's packed model, CUDA graphs -------------------------------------------------

# timm architecture, extra model args, the activation fused into fc1 ("none": exact GELU, "tanh"; None: left apart),
# whether the model has layer scales
PACKED = [
    ("vit_small_patch14_reg4_dinov2", {}, "none", True),  # registers, layer scale
    ("vit_giant_patch14_dinov2", {"mlp_ratio": 4.0}, None, True),  # SwiGLU, layer scale
    ("vit_base_patch16_siglip_224", {}, "none", False),  # MAP head (timm's SigLIP: exact GELU)
    ("vit_base_patch16_clip_quickgelu_224", {}, None, False),  # QuickGELU, pre-norm
    ("vit_base_patch16_clip_224", {}, "none", False),  # exact GELU, pre-norm, the projection as head
    ("deit_tiny_distilled_patch16_224", {}, "none", False),  # distillation token, two heads
    ("vit_medium_patch16_reg4_gap_256", {}, "none", True),  # gap: fc_norm over the mean patch token, layer scale
    ("vit_base_patch16_rpn_224", {}, "none", False),  # post-norm blocks
    ("vit_small_patch16_18x2_224", {"init_values": 0.1}, "none", True),  # parallel blocks, layer scale per branch
    ("hf-siglip", {}, "tanh", False),  # transformers' SigLIP: MAP head, tanh GELU (the MAP head's MLP too)
]


def hf_siglip_folder(tmp_path):
    """transformers' SiglipModel (MAP head, tanh GELU: `gelu_pytorch_tanh`), saved in its format."""
    transformers = pytest.importorskip("transformers")
    vision = {**HF_SMALL, "image_size": 32, "patch_size": 8}
    ref = hf_model(transformers.SiglipModel, transformers.SiglipConfig(vision_config=vision, text_config=TEXT))
    return save_hf(tmp_path, "siglip", ref)


def packed_pair(tmp_path, name: str, extra: dict, dtype: str = "float32"):
    """A perturbed random timm model (or `hf-siglip`) saved in its format and loaded twice: (plain, packed by the
    CPU runner)."""
    from app import runner

    if not runner.has_onednn_linear():
        pytest.skip("this torch has no oneDNN linear")
    if name == "hf-siglip":
        folder = hf_siglip_folder(tmp_path)
    else:
        timm = pytest.importorskip("timm")
        ref = perturb(timm.create_model(name, pretrained=False, num_classes=5, **SMALL, **extra))
        folder = save_timm(tmp_path, name, ref, {**{k: v for k, v in SMALL.items() if k != "img_size"}, **extra})
    plain = app.load_model(str(folder))
    served = app.load_model(str(folder), dtype=dtype)
    cpu = runner.make_runner(served, max_batch_size=4)
    assert cpu.fast_path == "onednn"
    return plain, served


def same_output(got, want, atol: float = ATOL, rtol: float = RTOL) -> None:
    def check(a, b):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)

    check(got.tokens, want.tokens)
    check(got.embedding, want.embedding)
    assert (got.logits is None) == (want.logits is None)
    if want.logits is not None:
        check(got.logits, want.logits)
    if want.attentions is not None:
        for g, w in zip(got.attentions, want.attentions, strict=True):
            check(g, w)
    if want.probe_attention is not None:
        check(got.probe_attention, want.probe_attention)


@pytest.mark.parametrize(("name", "extra", "fused", "scaled"), PACKED, ids=[p[0] for p in PACKED])
def test_packed_cpu_path_keeps_the_numbers(tmp_path, name, extra, fused, scaled):
    """The CPU runner packs the model in place (app.runner.pack_linears): layer scales folded into the linear layer
    ending their branch, exact and tanh GELUs fused into fc1, every linear layer packed; logits, default embedding,
    tokens and attention maps stay those of the unpacked model."""
    from app.model.twists import LayerScale
    from app.runner import OneDNNLinear

    plain, served = packed_pair(tmp_path, name, extra)
    modules = list(served.net.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in modules)
    assert not any(isinstance(m, LayerScale) for m in modules)  # folded, wherever there was one
    assert scaled == any(isinstance(m, LayerScale) for m in plain.net.modules())
    fc1s = [m.fc1 for m in modules if isinstance(getattr(m, "fc1", None), OneDNNLinear)]
    assert fc1s and all((f.attr, f.algorithm) == (("gelu", fused) if fused else ("none", "")) for f in fc1s)
    for n in (1, 3, 4, 6):  # 6: beyond the batch size packed for
        x = pixels(batch=n)
        same_output(served(x), plain(x))
    x = pixels()
    same_output(served(x, attentions=True), plain(x, attentions=True))


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "hf-siglip"])
def test_packed_bfloat16_close_to_float32(tmp_path, name):
    plain, served = packed_pair(tmp_path, name, {}, dtype="bfloat16")
    assert served.net.blocks[0].mlp.fc1.packed_weight.dtype == torch.bfloat16
    x = pixels()
    same_output(served(x), plain(x), atol=0.15, rtol=0.05)


def test_layer_scale_folds_into_a_post_norm_blocks_layer_norm(tmp_path):
    """Post-norm blocks with layer scale (x + ls(LN(branch))): the scale folds into the LayerNorm's affine map."""
    from app.checkpoints import native
    from app.model import VisionTransformer, ViTConfig
    from app.model.twists import LayerScale
    from app.preprocess import PreprocessConfig
    from app.runner import has_onednn_linear, make_runner

    if not has_onednn_linear():
        pytest.skip("this torch has no oneDNN linear")
    cfg = ViTConfig(
        image_size=(32, 32), patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_dim=128, num_classes=5,
        layer_scale=True, post_norm=True, final_norm=False, class_token=False, pool="mean", fc_norm=True,
    )  # fmt: skip
    net = perturb(VisionTransformer(cfg))
    pre = PreprocessConfig.from_dict({"resize": [32, 32], "crop": None, "mean": [0.5] * 3, "std": [0.5] * 3})
    native.save(tmp_path / "m.safetensors", cfg, net.state_dict(), pre, [f"c{i}" for i in range(5)])
    plain, served = (app.load_model(str(tmp_path / "m.safetensors")) for _ in range(2))
    make_runner(served, max_batch_size=4)
    assert not any(isinstance(m, LayerScale) for m in served.net.modules())
    x = pixels()
    same_output(served(x, attentions=True), plain(x, attentions=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["vit_base_patch16_siglip_224", "vit_small_patch14_reg4_dinov2"])
def test_cuda_graphs_give_the_eager_numbers(tmp_path, name):
    """CUDA graphs capture `Model.fast_forward` (tokens, logits); the default embedding (a MAP head's pooling, the
    class token) is computed from the graph's tokens by `Model.output`: the same numbers as the eager model."""
    timm = pytest.importorskip("timm")
    from app.runner import make_runner

    ref = perturb(timm.create_model(name, pretrained=False, num_classes=5, **SMALL))
    folder = save_timm(tmp_path, name, ref, {k: v for k, v in SMALL.items() if k != "img_size"})
    plain = app.load_model(str(folder), device="cuda", dtype="float32")
    served = app.load_model(str(folder), device="cuda", dtype="float32")
    cuda = make_runner(served, max_batch_size=4)
    assert cuda.fast_path == "cudagraph"
    cuda.graphs.capture_all()
    with torch.inference_mode():
        for n in (1, 3, 6):  # 3 pads to 4; 6 = 4 + 2
            x = pixels(batch=n).cuda()
            same_output(cuda.graphs(x), plain(x))
