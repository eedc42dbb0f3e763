"""timm checkpoints: our model gives timm's own numbers on the same weights; the preprocessing table is timm's.

Models come from timm.create_model(name, pretrained=False, <small overrides>) with every parameter perturbed,
saved as .safetensors and .pth (plain, wrapped in {"state_dict"} / {"model"}, and with a "module." prefix).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from app import load_model
from app.checkpoints import CheckpointError, read_checkpoint
from app.checkpoints import timm as timm_reader
from app.checkpoints.tables import imagenet_labels, timm_table
from app.engine import Normalizer
from app.preprocess import to_model_pixels

TOL = {"atol": 1e-4, "rtol": 1e-3}
MODELS = {
    # width 192: three heads from the standard-width table
    "tiny": ("vit_tiny_patch16_224", {"depth": 2, "img_size": 32, "patch_size": 8, "num_classes": 7}),
    # width 384, no qkv bias, no head
    "small_headless": (
        "vit_small_patch16_224",
        {"depth": 1, "img_size": 48, "patch_size": 16, "qkv_bias": False, "num_classes": 0},
    ),
}
FORMATS = ["safetensors", "pth", "pth_state_dict", "pth_model", "pth_module_prefix"]
CASES = [("tiny", fmt) for fmt in FORMATS] + [("small_headless", "safetensors"), ("small_headless", "pth")]
TAG = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def timm_model(name: str, perturb, seed: int = 0, **kwargs):
    import timm

    torch.manual_seed(seed)
    return perturb(timm.create_model(name, pretrained=False, **kwargs).eval(), seed=seed)


def write(model, path_stem, fmt: str):
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        path = path_stem.with_suffix(".safetensors")
        save_file(state_dict, path)
        return path
    wrapped = {
        "pth": state_dict,
        "pth_state_dict": {"state_dict": state_dict, "epoch": torch.tensor(3)},
        "pth_model": {"model": state_dict},
        "pth_module_prefix": {f"module.{k}": v for k, v in state_dict.items()},
    }[fmt]
    path = path_stem.with_suffix(".pth")
    torch.save(wrapped, path)
    return path


def timm_attentions(model, x) -> list[torch.Tensor]:
    """softmax(q k^T * scale) recomputed from timm's own qkv layers on the inputs its blocks see."""
    inputs = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: inputs.append(args[0])) for b in model.blocks]
    try:
        model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for block, h in zip(model.blocks, inputs, strict=True):
        attn = block.attn
        B, N, C = h.shape
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        maps.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1))
    return maps


@pytest.mark.parametrize(("which", "fmt"), CASES)
def test_same_numbers_as_timm(which, fmt, perturb, tmp_path):
    name, kwargs = MODELS[which]
    ref = timm_model(name, perturb, **kwargs)
    path = write(ref, tmp_path / "weights", fmt)
    size = kwargs["img_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tokens = ref.forward_features(x)
        embedding = ref.forward_head(tokens, pre_logits=True)
        logits = ref(x)
        maps = timm_attentions(ref, x)

    model = load_model(str(path))
    out = model(x, attentions=True)
    fast = model(x)
    torch.testing.assert_close(out.tokens, tokens, **TOL)
    torch.testing.assert_close(fast.tokens, tokens, **TOL)
    torch.testing.assert_close(out.embedding, embedding, **TOL)
    if kwargs["num_classes"]:
        torch.testing.assert_close(out.logits, logits, **TOL)
        torch.testing.assert_close(fast.logits, logits, **TOL)
    else:
        assert out.logits is None
    for ours, theirs in zip(out.attentions, maps, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    assert model.info["format"] == "timm"
    assert model.info["num_heads"] == ref.blocks[0].attn.num_heads
    assert model.net.norm.eps == ref.norm.eps == 1e-6


@pytest.fixture(scope="module")
def full_tiny(tmp_path_factory, perturb):
    """A full vit_tiny_patch16_224 (random, perturbed), saved once for the tests that name its architecture."""
    ref = timm_model(TAG, perturb)
    return ref, write(ref, tmp_path_factory.mktemp("full_tiny") / "weights", "safetensors")


def test_arch_with_pretrained_tag(full_tiny):
    """Heads, preprocessing and ImageNet labels from --arch NAME.TAG."""
    ref, path = full_tiny
    model = load_model(str(path), arch=TAG)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x), **TOL)
    assert model.labels == imagenet_labels() and model.labels[0] == "tench"
    assert model.info["preprocess"] == timm_reader.preprocess_config(timm_table()["pretrained"][TAG], "").to_dict()
    assert model.info["preprocess"]["resize"] == 248  # floor(224 / 0.9)


def test_arch_without_tag_uses_family_default(full_tiny):
    ckpt = read_checkpoint(str(full_tiny[1]), arch="vit_tiny_patch16_224")
    default = timm_table()["architectures"]["vit_tiny_patch16_224"]["default_tag"]
    expected = timm_reader.preprocess_config(timm_table()["pretrained"][f"vit_tiny_patch16_224.{default}"], "")
    assert ckpt.preprocess == expected
    assert read_checkpoint(str(full_tiny[1])).preprocess == expected  # inferred: the same shape, vit_* first


def test_arch_that_does_not_fit_the_weights(perturb, tmp_path):
    path = write(timm_model("vit_tiny_patch16_224", perturb, depth=2, img_size=32), tmp_path / "w", "pth")
    with pytest.raises(CheckpointError, match=r"do not fit architecture vit_tiny_patch16_224: depth 2 \(not 12\)"):
        read_checkpoint(str(path), arch="vit_tiny_patch16_224")
    with pytest.raises(CheckpointError, match="no pretrained tag 'nope'"):
        read_checkpoint(str(path), arch="vit_tiny_patch16_224.nope")


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("vit_tinyest_patch3_7", "unknown timm architecture 'vit_tinyest_patch3_7'"),
        ("vit_base_patch16_rope_224", "RoPE"),
        ("vit_relpos_base_patch16_224", "relative position bias"),
        ("vit_base_r50_s16_224", "hybrid CNN stem"),
        ("vit_b_16", "a torchvision name"),
    ],
)
def test_unknown_or_unsupported_arch(arch, message, perturb, tmp_path):
    path = write(timm_model("vit_tiny_patch16_224", perturb, depth=1, img_size=32), tmp_path / "w", "pth")
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(str(path), arch=arch)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("vit_tiny_patch16_224", {"qk_norm": True}, "qk norm"),
        # the keys of CLIP- and SigLIP-style weights do not say their activation
        ("vit_tiny_patch16_224", {"pre_norm": True}, "activation.*--arch"),
        ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg", "fc_norm": False}, "activation.*--arch"),
    ],
)
def test_unsupported_timm_models_are_refused(name, kwargs, message, perturb, tmp_path):
    ref = timm_model(name, perturb, depth=1, img_size=32, patch_size=8, **kwargs)
    path = write(ref, tmp_path / "w", "safetensors")
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("vit_tiny_patch16_224", {"reg_tokens": 4}),
        ("deit_tiny_distilled_patch16_224", {}),
        ("vit_tiny_patch16_224", {"init_values": 1e-5}),
        ("vit_tiny_patch16_224", {"global_pool": "avg"}),
        ("vit_tiny_patch16_224", {"no_embed_class": True}),
        ("vit_tiny_patch16_224", {"no_embed_class": True, "reg_tokens": 2}),
    ],
)
def test_bare_family_weights_load_from_their_keys(name, kwargs, perturb, tmp_path):
    """Registers, distillation, layer scale, average pooling and no_embed_class are read from the keys alone."""
    ref = timm_model(name, perturb, depth=1, img_size=32, patch_size=8, **kwargs)
    model = load_model(str(write(ref, tmp_path / "w", "safetensors")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = ref.forward_features(x)
        torch.testing.assert_close(model(x).logits, ref.forward_head(feats), atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(model(x).embedding, ref.forward_head(feats, pre_logits=True), atol=1e-4, rtol=1e-3)


def test_unknown_width_needs_heads(perturb, tmp_path):
    ref = timm_model("vit_tiny_patch16_224", perturb, depth=1, img_size=32, patch_size=8, embed_dim=32, num_heads=2)
    path = write(ref, tmp_path / "w", "pth")
    with pytest.raises(CheckpointError, match=r"width of 32 .*pass --arch"):
        read_checkpoint(str(path))
    (tmp_path / "config.json").write_text(json.dumps({"model_args": {"num_heads": 2}}))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(path))(x).logits, ref(x), **TOL)


def test_timm_hub_folder_layout(perturb, tmp_path):
    """What timm pushes to the Hub (save_for_hf): config.json with architecture, model_args, pretrained_cfg."""
    from timm.models._hub import save_for_hf

    ref = timm_model("vit_tiny_patch16_224", perturb, depth=2, img_size=32, patch_size=8, num_classes=3)
    save_for_hf(ref, tmp_path / "repo", safe_serialization=True, model_config={"label_names": ["a", "b", "c"]})
    model = load_model(str(tmp_path / "repo"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x), **TOL)
    assert model.labels == ["a", "b", "c"]
    assert model.info["preprocess"]["crop_pct"] == ref.pretrained_cfg["crop_pct"]


@pytest.mark.parametrize("new_size", [48, 24])
def test_served_at_another_size_matches_timm_resampling(new_size, perturb, tmp_path):
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref = timm_model("vit_tiny_patch16_224", perturb, depth=2, img_size=32, patch_size=8, num_classes=5)
    path = write(ref, tmp_path / "w", "safetensors")
    resized = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, img_size=new_size, patch_size=8, num_classes=5
    ).eval()
    resized.load_state_dict(checkpoint_filter_fn(ref.state_dict(), resized))  # timm's own resample_abs_pos_embed
    model = load_model(str(path), image_size=new_size)
    x = torch.randn(2, 3, new_size, new_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, resized(x), **TOL)
    assert model.info["image_size"] == [new_size, new_size]
    assert model.info["grid"] == [new_size // 8, new_size // 8]


def test_served_at_384_agrees_with_timm_model_and_data_config(full_tiny, photos):
    """A 224 model served at 384: pixels and logits as timm's own model created at img_size=384."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref, path = full_tiny
    at_384 = timm.create_model(TAG, pretrained=False, img_size=384).eval()
    at_384.load_state_dict(checkpoint_filter_fn(ref.state_dict(), at_384))
    model = load_model(str(path), arch=TAG, image_size=384)

    transform = create_transform(**resolve_data_config({"img_size": 384}, model=at_384))
    theirs = torch.stack([transform(img) for img in photos])
    ours = model.preprocess(photos)
    assert model.info["preprocess"]["resize"] == 426  # floor(384 / 0.9)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # one image through both 577-token models is enough
        torch.testing.assert_close(model(ours[:1]).logits, at_384(theirs[:1]), **TOL)


def _described_transform(transform) -> dict:
    """timm's eval Compose -> the fields a PreprocessConfig holds."""
    from torchvision import transforms as T

    steps = {type(t).__name__: t for t in transform.transforms}
    resize, crop, norm = steps["Resize"], steps["CenterCrop"], steps["Normalize"]
    assert set(steps) <= {"Resize", "CenterCrop", "MaybeToTensor", "Normalize"}, steps
    assert isinstance(resize, T.Resize)
    size = resize.size if isinstance(resize.size, int) else tuple(resize.size)
    return {
        "resize": size[0] if isinstance(size, list | tuple) and len(size) == 1 else size,
        "crop": tuple(crop.size),
        "interpolation": resize.interpolation.value,
        "mean": torch.as_tensor(norm.mean, dtype=torch.float32),
        "std": torch.as_tensor(norm.std, dtype=torch.float32),
    }


def test_every_table_entry_is_timms_pretrained_cfg_and_transform(photos):
    """Each tag in app/data/timm_pretrained.json against timm's registry and the transform timm builds from it."""
    import timm
    from timm.data import create_transform, resolve_data_config

    table = timm_table()
    checked_pixels = set()
    for tag, entry in table["pretrained"].items():
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg is not None, tag
        data_config = resolve_data_config(pretrained_cfg=cfg.to_dict())
        transform = create_transform(**data_config)
        ours = timm_reader.preprocess_config(entry, tag)
        theirs = _described_transform(transform)
        mine = {"resize": ours.resize, "crop": ours.crop, "interpolation": ours.interpolation}
        for stat in ("mean", "std"):  # timm holds them as float32 tensors
            torch.testing.assert_close(torch.tensor(getattr(ours, stat)), theirs.pop(stat), msg=tag)
        assert mine == theirs, tag
        assert ours.crop_pct == data_config["crop_pct"], tag
        key = (*mine.items(), ours.mean, ours.std)
        if key not in checked_pixels:  # the pixels themselves, once per distinct pipeline
            checked_pixels.add(key)
            got = Normalizer(ours)(torch.from_numpy(to_model_pixels(photos[0], ours).copy())[None])[0]
            torch.testing.assert_close(got, transform(photos[0]), atol=1e-5, rtol=1e-5)
    assert len(checked_pixels) >= 3


def test_table_architectures_are_timms(tmp_path):
    """The shapes recorded per architecture are those of timm's models (built on the meta device)."""
    import timm

    for name, entry in timm_table()["architectures"].items():
        if "patch16_224" not in name:
            continue  # one resolution per family is enough: the others differ only in image size
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False)
        assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (
            entry["embed_dim"],
            entry["depth"],
            entry["num_heads"],
        ), name
        assert m.patch_embed.patch_size[0] == entry["patch_size"], name
        assert m.blocks[0].mlp.fc1.out_features == entry["mlp_dim"], name
