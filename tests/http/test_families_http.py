"""The model families through /v1 and /v2 on real photographs, against the reference libraries themselves.

Small random models are built by transformers, timm and open_clip (every parameter perturbed), saved in each
format with the preprocessing that format ships (transformers' own image processors write
`preprocessor_config.json`; timm's `config.json` names the architecture, its `model_args` and `pretrained_cfg`;
open_clip's `open_clip_config.json`), and served together by the real app. A JPEG of a photograph is posted; the
reference is the library's own model on the library's own preprocessing of the same decoded image: PIL's decoder
on both sides (`jpeg_decoder="pil"`), at full scale (`jpeg_draft=False`: the default DCT-scaled decoding of a
photo much larger than a small model's input is another image than the libraries decode).

transformers' default image processors resize with torchvision tensors; their `*ImageProcessorPil` twins resize
with PIL, as the server does, and are the references here, at float32 tolerance (atol 1e-4, rtol 1e-3). The
server's answers are also checked against our engine on the library's pixels, which isolates the model from the
preprocessing.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from http_support import encode, photo, serve
from PIL import Image
from safetensors.torch import save_file

import app as vit
from app.http.factory import create_app
from app.settings import Settings

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

ATOL, RTOL = 1e-4, 1e-3
JPEG = {"content-type": "image/jpeg"}
PHOTOS = ("chelsea", "astronaut", "coffee")
HF_VISION = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


def close(ours, theirs) -> None:
    torch.testing.assert_close(
        torch.as_tensor(np.asarray(ours), dtype=torch.float32), theirs.float(), atol=ATOL, rtol=RTOL
    )


def features(result) -> torch.Tensor:
    """get_image_features: a tensor, or in recent transformers an output whose pooler_output it is."""
    return result if isinstance(result, torch.Tensor) else result.pooler_output


class Family:
    """One served model: its reference module, the reference preprocessing (PIL image -> batch tensor) and
    functions of the reference's outputs on those pixels."""

    def __init__(self, name, path, ref, pixels, embedding, logits=None, mean_pool=None, expect=None):
        self.name, self.path, self.ref, self.pixels = name, path, ref, pixels
        self.embedding, self.logits, self.mean_pool = embedding, logits, mean_pool
        self.expect = expect or {}


def hf_processor_dict(processor) -> dict:
    return json.loads(processor.to_json_string())


def build_clip(root: Path) -> Family:
    vision = {**HF_VISION, "image_size": 224, "patch_size": 32}
    config = transformers.CLIPConfig(vision_config=vision, text_config=TEXT, projection_dim=24)
    ref = transformers.CLIPModel(config)
    ref.set_attn_implementation("eager")
    perturb(ref, 1)
    folder = root / "clip"
    ref.save_pretrained(folder)
    processor = transformers.CLIPImageProcessorPil()  # OpenAI's: shortest edge 224, crop 224, bicubic
    processor.save_pretrained(folder)

    def tokens(x):
        v = ref.vision_model(x)
        return ref.vision_model.post_layernorm(v.last_hidden_state)

    return Family(
        "clip",
        folder,
        ref,
        lambda img: processor(images=img, return_tensors="pt")["pixel_values"],
        lambda x: features(ref.get_image_features(pixel_values=x)),
        mean_pool=lambda x: tokens(x)[:, 1:].mean(dim=1),
        expect={
            "family": "clip",
            "pool": "cls",
            "prefix_tokens": {"class": 1, "distillation": 0, "registers": 0},
            "embedding_dim": 24,
            "num_classes": 0,
            "image_size": [224, 224],
            "preprocess": {
                "resize": 224,
                "crop": [224, 224],
                "interpolation": "bicubic",
                "mean": list(OPENAI_MEAN),
                "std": list(OPENAI_STD),
            },
            "grid": [7, 7],
        },
    )


def build_siglip(root: Path) -> Family:
    vision = {**HF_VISION, "image_size": 224, "patch_size": 32}
    config = transformers.SiglipConfig(vision_config=vision, text_config=TEXT, num_labels=3)
    ref = transformers.SiglipForImageClassification(config)
    ref.set_attn_implementation("eager")
    perturb(ref, 2)
    folder = root / "siglip"
    ref.save_pretrained(folder)
    processor = transformers.SiglipImageProcessorPil()  # 224x224 squashed, bicubic, mean = std = 0.5
    processor.save_pretrained(folder)
    return Family(
        "siglip",
        folder,
        ref,
        lambda img: processor(images=img, return_tensors="pt")["pixel_values"],
        lambda x: ref.vision_model(x).pooler_output,
        logits=lambda x: ref(pixel_values=x).logits,
        mean_pool=lambda x: ref.vision_model(x).last_hidden_state.mean(dim=1),
        expect={
            "family": "siglip",
            "pool": "map",
            "prefix_tokens": {"class": 0, "distillation": 0, "registers": 0},
            "embedding_dim": 64,
            "num_classes": 3,
            "image_size": [224, 224],
            "preprocess": {"resize": [224, 224], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3},
            "grid": [7, 7],
        },
    )


def build_hf_dinov2_reg(root: Path) -> Family:
    """As HF ships DINOv2 with registers: config.json says 518, the BitImageProcessor crops 224 (from 256)."""
    config = transformers.Dinov2WithRegistersConfig(
        **HF_VISION, image_size=518, patch_size=14, num_register_tokens=4, num_labels=3
    )
    ref = transformers.Dinov2WithRegistersForImageClassification(config)
    ref.set_attn_implementation("eager")
    perturb(ref, 3)
    folder = root / "dinov2reg"
    ref.save_pretrained(folder)
    processor = transformers.BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=3,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    processor.save_pretrained(folder)
    trunk = ref.dinov2_with_registers
    return Family(
        "dinov2reg",
        folder,
        ref,
        lambda img: processor(images=img, return_tensors="pt")["pixel_values"],
        lambda x: trunk(x).pooler_output,
        logits=lambda x: ref(pixel_values=x).logits,
        mean_pool=lambda x: trunk(x).last_hidden_state[:, 5:].mean(dim=1),
        expect={
            "family": "dinov2",
            "pool": "cls",
            "prefix_tokens": {"class": 1, "distillation": 0, "registers": 4},
            "embedding_dim": 64,
            "num_classes": 3,
            "image_size": [224, 224],
            "preprocess": {
                "resize": 256,
                "crop": [224, 224],
                "interpolation": "bicubic",
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
            "grid": [16, 16],
        },
    )


def build_hf_dinov2(root: Path) -> Family:
    """Dinov2ForImageClassification: its head reads the class token and the mean patch token side by side."""
    config = transformers.Dinov2Config(**HF_VISION, image_size=518, patch_size=14, num_labels=4)
    ref = transformers.Dinov2ForImageClassification(config)
    ref.set_attn_implementation("eager")
    perturb(ref, 11)
    folder = root / "dinov2"
    ref.save_pretrained(folder)
    processor = transformers.BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=3,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    processor.save_pretrained(folder)
    return Family(
        "dinov2",
        folder,
        ref,
        lambda img: processor(images=img, return_tensors="pt")["pixel_values"],
        lambda x: ref.dinov2(x).pooler_output,
        logits=lambda x: ref(pixel_values=x).logits,
        mean_pool=lambda x: ref.dinov2(x).last_hidden_state[:, 1:].mean(dim=1),
        expect={
            "family": "dinov2",
            "pool": "cls",
            "prefix_tokens": {"class": 1, "distillation": 0, "registers": 0},
            "embedding_dim": 64,
            "num_classes": 4,
            "image_size": [224, 224],
            "grid": [16, 16],
        },
    )


def build_hf_deit(root: Path) -> Family:
    """DeiTForImageClassificationWithTeacher: the mean of its class and distillation heads; DeiT's processor
    squashes to 256x256, then centre-crops 224."""
    config = transformers.DeiTConfig(**HF_VISION, image_size=224, patch_size=32, num_labels=4)
    ref = transformers.DeiTForImageClassificationWithTeacher(config)
    ref.set_attn_implementation("eager")
    perturb(ref, 12)
    folder = root / "deit"
    ref.save_pretrained(folder)
    processor = transformers.DeiTImageProcessorPil()
    processor.save_pretrained(folder)

    def embedding(x):
        tokens = ref.deit(x).last_hidden_state
        return (tokens[:, 0] + tokens[:, 1]) / 2

    return Family(
        "hf_deit",
        folder,
        ref,
        lambda img: processor(images=img, return_tensors="pt")["pixel_values"],
        embedding,
        logits=lambda x: ref(pixel_values=x).logits,
        mean_pool=lambda x: ref.deit(x).last_hidden_state[:, 2:].mean(dim=1),
        expect={
            "family": "deit_distilled",
            "pool": "cls",
            "prefix_tokens": {"class": 1, "distillation": 1, "registers": 0},
            "embedding_dim": 64,
            "num_classes": 4,
            "image_size": [224, 224],
            "preprocess": {"resize": [256, 256], "crop": [224, 224], "interpolation": "bicubic"},
            "grid": [7, 7],
        },
    )


def build_timm(root: Path, name: str, arch: str, size: int, num_classes: int, seed: int, **expect) -> Family:
    """A timm model saved as timm pushes one: model.safetensors + config.json with the architecture, its
    model_args and the pretrained cfg (the default tag's, at this input size)."""
    args = {"patch_size": 16, "depth": 2, "embed_dim": 64, "num_heads": 2}
    if "dinov2" in arch:
        args["patch_size"] = 14
    ref = perturb(timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=size, **args), seed)
    folder = root / name
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "model.safetensors"))
    pretrained = {**ref.pretrained_cfg, "input_size": [3, size, size]}
    pretrained = {k: v for k, v in pretrained.items() if isinstance(v, (str, int, float, list, tuple, type(None)))}
    config = {"architecture": arch, "num_classes": num_classes, "model_args": args, "pretrained_cfg": pretrained}
    (folder / "config.json").write_text(json.dumps(config))
    data = timm.data.resolve_data_config({}, model=ref)
    data["input_size"] = (3, size, size)
    transform = timm.data.create_transform(**data)

    def pre_logits(x):
        return ref.forward_head(ref.forward_features(x), pre_logits=True)

    def mean_pool(x):  # timm's fc_norm is an identity unless the model averages
        return ref.fc_norm(ref.forward_features(x)[:, ref.num_prefix_tokens :].mean(dim=1))

    return Family(
        name,
        folder,
        ref,
        lambda img: transform(img).unsqueeze(0),
        pre_logits if num_classes else ref,
        logits=ref if num_classes else None,
        mean_pool=mean_pool,
        expect={"image_size": [size, size], "num_classes": num_classes, "embedding_dim": 64, **expect},
    )


def build_open_clip(root: Path) -> Family:
    vision = {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32, "ls_init_value": 0.5}
    text = {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    ref = perturb(open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True), 6)
    folder = root / "openclip"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    preprocess_cfg = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic"}
    cfg = {
        "model_cfg": {"embed_dim": 16, "quick_gelu": True, "vision_cfg": vision, "text_cfg": text},
        "preprocess_cfg": preprocess_cfg,
    }
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    preprocess = open_clip.image_transform(64, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)

    def mean_pool(x):
        ref.visual.output_tokens = True
        try:
            _, patch_tokens = ref.visual(x)  # through ln_post
        finally:
            ref.visual.output_tokens = False
        return patch_tokens.mean(dim=1)

    return Family(
        "openclip",
        folder / "open_clip_model.safetensors",
        ref,
        lambda img: preprocess(img).unsqueeze(0),
        ref.encode_image,
        mean_pool=mean_pool,
        expect={
            "family": "clip",
            "pool": "cls",
            "prefix_tokens": {"class": 1, "distillation": 0, "registers": 0},
            "embedding_dim": 16,
            "num_classes": 0,
            "image_size": [64, 64],
            "preprocess": {
                "resize": 64,
                "crop": [64, 64],
                "interpolation": "bicubic",
                "mean": list(OPENAI_MEAN),
                "std": list(OPENAI_STD),
            },
            "grid": [4, 4],
        },
    )


# timm's own files: name, architecture, input size, classes, seed, and what ModelInfo must say (family, pool,
# class / distillation / register tokens)
TIMM_FAMILIES = [
    ("timm_dinov2reg", "vit_small_patch14_reg4_dinov2", 56, 0, 4, "dinov2", "cls", (1, 0, 4)),
    ("deit_distilled", "deit_tiny_distilled_patch16_224", 64, 5, 5, "deit_distilled", "cls", (1, 1, 0)),
    ("gap", "vit_medium_patch16_gap_256", 64, 5, 7, "vit_gap", "mean", (0, 0, 0)),
    ("gap_reg", "vit_medium_patch16_reg4_gap_256", 64, 5, 8, "vit_gap", "mean", (0, 0, 4)),
]


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Family]:
    root = tmp_path_factory.mktemp("families")
    built = [
        build_clip(root),
        build_siglip(root),
        build_hf_dinov2_reg(root),
        build_hf_dinov2(root),
        build_hf_deit(root),
        build_open_clip(root),
        *(
            build_timm(
                root,
                name,
                arch,
                size,
                classes,
                seed,
                family=family,
                pool=pool,
                grid=[4, 4],
                prefix_tokens=dict(zip(("class", "distillation", "registers"), prefix, strict=True)),
            )
            for name, arch, size, classes, seed, family, pool, prefix in TIMM_FAMILIES
        ),
    ]
    return {f.name: f for f in built}


@pytest.fixture(scope="module")
def jpegs() -> dict[str, bytes]:
    return {n: encode(photo(n).convert("RGB"), "JPEG", quality=90) for n in PHOTOS}


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def settings(families: dict[str, Family], *names: str) -> Settings:
    specs = [f"{n}={families[n].path}" for n in (names or families)]
    return Settings(
        model=specs,
        device="cpu",
        dtype="float32",
        decode_workers=1,
        decode_pool="thread",
        jpeg_decoder="pil",
        jpeg_draft=False,
    )


@pytest.fixture(scope="module")
def client(families) -> TestClient:
    """Every family in one server. Loading a CLIP model, whose projection head gives no logits, warms it up on
    embeddings (it used to warm up on classification, and the server refused to start)."""
    app = create_app(settings(families))
    with TestClient(app) as c:
        for _ in range(6000):
            if c.get("/readyz").status_code == 200:
                break
            assert app.state.vit.load_error is None, app.state.vit.load_error
            time.sleep(0.02)
        yield c


@pytest.fixture(scope="module")
def engines(families) -> dict:
    return {n: vit.load_model(str(f.path), device="cpu", dtype="float32") for n, f in families.items()}


NAMES = [
    "clip",
    "siglip",
    "dinov2reg",
    "dinov2",
    "hf_deit",
    "timm_dinov2reg",
    "deit_distilled",
    "openclip",
    "gap",
    "gap_reg",
]


def reference(family: Family, what, data: bytes) -> torch.Tensor:
    with torch.no_grad():
        return what(family.pixels(decoded(data)))[0]


# -- 1. the default embedding --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_default_embedding_matches_the_library_on_its_own_preprocessing(client, families, engines, jpegs, name):
    family = families[name]
    data = jpegs["chelsea"]
    r = client.post(f"/v1/embed?model={name}", content=data, headers=JPEG)
    assert r.status_code == 200, r.text
    body = r.json()
    served = body["results"][0]["embedding"]
    expected = reference(family, family.embedding, data)
    assert body["dim"] == len(served) == family.expect["embedding_dim"] == expected.shape[0]
    close(served, expected)
    # the model alone, on the library's pixels: the engine and the library agree whatever the preprocessing
    with torch.no_grad():
        pixels = family.pixels(decoded(data))
        close(engines[name](pixels).embedding[0], family.embedding(pixels)[0])


@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2reg"])
def test_default_embedding_against_transformers_default_processor(client, families, engines, jpegs, name):
    """transformers' default image processor (what AutoImageProcessor loads from the saved folder) resizes
    torchvision tensors, not PIL images: its pixels differ from PIL's by up to 2 grey levels, which moves these
    random models' embeddings by up to about 3e-3 of their largest component (CLIP on one photo: 2.6e-3). The server
    stays within 1e-2 of it, and our engine on those very pixels matches the library at float32 tolerance: the
    exact check; the PIL processors' tests above compare the server itself at 1e-4."""
    family = families[name]
    processor = transformers.AutoImageProcessor.from_pretrained(family.path)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    for photo_name in PHOTOS:
        data = jpegs[photo_name]
        pixels = processor(images=decoded(data), return_tensors="pt")["pixel_values"]
        grey_levels = ((pixels - family.pixels(decoded(data))) * std * 255).abs().max()
        assert grey_levels < 2.01
        r = client.post(f"/v1/embed?model={name}", content=data, headers=JPEG)
        served = torch.tensor(r.json()["results"][0]["embedding"])
        with torch.no_grad():
            expected = family.embedding(pixels)[0]
            close(engines[name](pixels).embedding[0], expected)
        assert (served - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_a_projection_model_warms_up_on_embeddings(engines):
    """CLIP's head is its image-text projection: the model gives no logits, so its warm-up embeds (a warm-up
    that classified raised "this model has no classification head" and the server never became ready)."""
    from app.runner import FAST, make_runner, warmup_items
    from app.tasks import Embed

    for name in ("clip", "openclip"):
        runner = make_runner(engines[name], max_batch_size=2, fast=False, jpeg_decoder="pil")
        items = warmup_items(runner, 2, FAST)
        assert all(isinstance(item.task, Embed) for item in items)
        runner.warmup(2)


# -- 2. the model's description ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_model_info_tells_the_family_and_the_processor(client, families, name):
    family = families[name]
    info = client.get(f"/v1/models/{name}").json()
    expect = family.expect
    for key in ("family", "pool", "prefix_tokens", "embedding_dim", "num_classes", "image_size"):
        assert info[key] == expect[key], key
    for key, value in expect.get("preprocess", {}).items():
        if key in ("mean", "std"):
            np.testing.assert_allclose(info["preprocess"][key], value, rtol=1e-6)
        else:
            assert info["preprocess"][key] == value, key


def test_timm_preprocessing_is_timms_eval_transform(client, families):
    """timm's config.json pretrained cfg -> resize floor(size / crop_pct), centre-crop size, its mean and std."""
    for name in ("timm_dinov2reg", "deit_distilled", "gap", "gap_reg"):
        family = families[name]
        cfg = timm.data.resolve_data_config({}, model=family.ref)
        size = family.expect["image_size"][0]
        pp = client.get(f"/v1/models/{name}").json()["preprocess"]
        assert pp["crop"] == [size, size] and pp["interpolation"] == cfg["interpolation"]
        assert pp["resize"] == int(size / cfg["crop_pct"]) or pp["resize"] == [int(size / cfg["crop_pct"])] * 2
        np.testing.assert_allclose(pp["mean"], cfg["mean"], rtol=1e-6)
        np.testing.assert_allclose(pp["std"], cfg["std"], rtol=1e-6)


# -- 3. classification ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip", "openclip", "timm_dinov2reg"])
def test_classify_refuses_a_projection_or_a_model_without_a_head(client, jpegs, name):
    r = client.post(f"/v1/classify?model={name}", content=jpegs["coffee"], headers=JPEG)
    assert r.status_code == 422, r.text
    assert "no classification head" in r.text


@pytest.mark.parametrize("name", ["siglip", "dinov2reg", "dinov2", "hf_deit", "deit_distilled", "gap", "gap_reg"])
def test_classify_matches_the_librarys_classifier(client, families, jpegs, name):
    family = families[name]
    for photo_name in ("astronaut", "coffee"):
        data = jpegs[photo_name]
        n = family.expect["num_classes"]
        r = client.post(f"/v1/classify?model={name}&top_k={n}", content=data, headers=JPEG)
        assert r.status_code == 200, r.text
        predictions = r.json()["results"][0]["predictions"]
        probs = reference(family, family.logits, data).softmax(dim=0)
        assert predictions[0]["index"] == int(probs.argmax())
        scores = torch.zeros(n)
        for p in predictions:
            scores[p["index"]] = p["score"]
        close(scores, probs)


# -- 4. pooling choices ---------------------------------------------------------------------------------------


def test_cls_pool_is_refused_without_a_class_token(client, jpegs):
    for name in ("siglip", "gap", "gap_reg"):
        r = client.post(f"/v1/embed?model={name}&pool=cls", content=jpegs["chelsea"], headers=JPEG)
        assert r.status_code == 422, r.text
        assert "no class token" in r.text


@pytest.mark.parametrize("name", NAMES)
def test_mean_pool_is_the_mean_of_the_patch_tokens_only(client, families, jpegs, name):
    family = families[name]
    data = jpegs["astronaut"]
    r = client.post(f"/v1/embed?model={name}&pool=mean", content=data, headers=JPEG)
    assert r.status_code == 200, r.text
    served = r.json()["results"][0]["embedding"]
    expected = reference(family, family.mean_pool, data)
    if name.startswith("gap"):  # the mean pool of an average-pooled model is its default embedding
        close(served, reference(family, family.embedding, data))
    if name == "gap_reg":  # registers left out, then fc_norm (timm's final norm is an identity here)
        assert not isinstance(family.ref.fc_norm, torch.nn.Identity)
        assert isinstance(family.ref.norm, torch.nn.Identity)
    close(served, expected)


def test_cls_pool_of_clip_is_the_unprojected_class_token(client, families, jpegs):
    family = families["clip"]
    data = jpegs["coffee"]
    r = client.post("/v1/embed?model=clip&pool=cls", content=data, headers=JPEG)
    assert r.status_code == 200 and r.json()["dim"] == 64
    close(
        r.json()["results"][0]["embedding"], reference(family, lambda x: family.ref.vision_model(x).pooler_output, data)
    )


# -- 5. attention maps ----------------------------------------------------------------------------------------

METHODS = {
    "clip": ("cls", "rollout"),
    "siglip": ("probe", "probe_rollout"),
    "dinov2reg": ("cls", "rollout"),
    "dinov2": ("cls", "rollout"),
    "hf_deit": ("cls", "rollout"),
    "timm_dinov2reg": ("cls", "rollout"),
    "deit_distilled": ("cls", "rollout"),
    "openclip": ("cls", "rollout"),
    "gap": ("mean", "mean_rollout"),
    "gap_reg": ("mean", "mean_rollout"),
}


@pytest.mark.parametrize("name", NAMES)
def test_attention_names_its_method_and_covers_the_patch_grid(client, families, jpegs, name):
    family = families[name]
    grid = family.expect["grid"]
    data = jpegs["chelsea"]
    for method, expected in zip(("cls", "rollout"), METHODS[name], strict=True):
        r = client.post(f"/v1/attention?model={name}&method={method}", content=data, headers=JPEG)
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert result["method"] == expected
        assert result["grid"] == grid
        heat = np.asarray(result["heatmap"])
        assert heat.shape in ((grid[0] * grid[1],), tuple(grid))
        assert np.isfinite(heat).all()
    r = client.post(f"/v1/attention?model={name}&format=png", content=data, headers=JPEG)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size[0] > 0


def test_probe_attention_is_the_siglip_heads_attention_over_the_patches(client, families, jpegs):
    """SigLIP's MAP head: its probe's attention (mean over heads) over the patch tokens."""
    family = families["siglip"]
    data = jpegs["coffee"]
    r = client.post("/v1/attention?model=siglip&method=cls", content=data, headers=JPEG)
    heat = torch.tensor(r.json()["results"][0]["heatmap"]).flatten()
    head = family.ref.vision_model.head
    with torch.no_grad():
        tokens = family.ref.vision_model(family.pixels(decoded(data))).last_hidden_state
        probe = head.probe.repeat(tokens.shape[0], 1, 1)
        _, weights = head.attention(probe, tokens, tokens, need_weights=True, average_attn_weights=True)
    close(heat, weights[0, 0] / weights[0, 0].max())  # heatmaps are divided by their maximum


def test_cls_attention_leaves_out_registers_and_distillation(client, families, jpegs, engines):
    """The class token's last-layer row over the patch columns only, against the library's own attentions."""
    data = jpegs["astronaut"]
    family = families["dinov2reg"]
    r = client.post("/v1/attention?model=dinov2reg&method=cls", content=data, headers=JPEG)
    heat = torch.tensor(r.json()["results"][0]["heatmap"]).flatten()
    with torch.no_grad():
        out = family.ref.dinov2_with_registers(family.pixels(decoded(data)), output_attentions=True)
    row = out.attentions[-1][0].mean(dim=0)[0, 5:]  # the class row over the 16x16 patch columns
    close(heat, row / row.max())  # heatmaps are divided by their maximum


# -- 6. v2 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip", "siglip", "deit_distilled"])
def test_v2_embedding_output_is_the_default_embedding(client, families, jpegs, name):
    family = families[name]
    data = jpegs["chelsea"]
    body = {
        "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(data).decode()]}],
        "outputs": [{"name": "embedding"}],
    }
    r = client.post(f"/v2/models/{name}/infer", json=body)
    assert r.status_code == 200, r.text
    (output,) = r.json()["outputs"]
    assert output["name"] == "embedding"
    assert output["shape"] == [1, family.expect["embedding_dim"]]
    close(output["data"], reference(family, family.embedding, data))


# -- 7. two families in one server ------------------------------------------------------------------------------


def test_two_families_served_at_once_stay_apart(families, jpegs):
    """Concurrent requests to CLIP and SigLIP: each batch holds one model's images, each answer its model's."""
    app = create_app(settings(families, "clip", "siglip"))
    names = ("clip", "siglip") * 3
    photos = [jpegs[PHOTOS[i % 3]] for i in range(len(names))]

    async def main():
        async with serve(app) as client:
            return await asyncio.gather(
                *(
                    client.post(f"/v1/embed?model={n}", content=d, headers=JPEG)
                    for n, d in zip(names, photos, strict=True)
                )
            )

    answers = asyncio.run(main())
    for name, data, r in zip(names, photos, answers, strict=True):
        assert r.status_code == 200, r.text
        family = families[name]
        assert r.json()["model"] == name
        close(r.json()["results"][0]["embedding"], reference(family, family.embedding, data))


def test_bare_timm_state_dicts_with_arch(tmp_path, jpegs):
    """timm weights alone (no config.json), their architecture given by --arch (the pretrained tag's
    preprocessing): a DeiT distilled at its own size, a DINOv2 with registers served at 56 (--image-size), both
    at the architectures' real widths and depths (--arch checks them), in one server."""
    specs = {"deit_tiny_distilled_patch16_224": (224, None), "vit_small_patch14_reg4_dinov2": (56, 56)}
    refs, transforms, names, archs, sizes = {}, {}, [], [], []
    for seed, (arch, (size, image_size)) in enumerate(specs.items()):
        ref = perturb(timm.create_model(arch, pretrained=False, num_classes=10, img_size=size), seed + 10)
        path = tmp_path / f"{arch}.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
        data = timm.data.resolve_data_config({}, model=ref)
        data["input_size"] = (3, size, size)
        refs[arch], transforms[arch] = ref, timm.data.create_transform(**data)
        names.append(f"{arch}={path}")
        archs.append(arch)
        sizes.append(image_size)
    settings = Settings(
        model=names,
        arch=archs,
        image_size=sizes,
        device="cpu",
        dtype="float32",
        decode_workers=1,
        decode_pool="thread",
        jpeg_decoder="pil",
        jpeg_draft=False,
    )
    app = create_app(settings)
    data = jpegs["coffee"]

    async def main():
        async with serve(app) as client:
            answers = {}
            for arch in specs:
                info = (await client.get(f"/v1/models/{arch}")).json()
                embed = await client.post(f"/v1/embed?model={arch}", content=data, headers=JPEG)
                classify = await client.post(f"/v1/classify?model={arch}&top_k=10", content=data, headers=JPEG)
                answers[arch] = info, embed.json(), classify.json()
            return answers

    answers = asyncio.run(main())
    for arch, (info, embed, classify) in answers.items():
        ref = refs[arch]
        with torch.no_grad():
            x = transforms[arch](decoded(data)).unsqueeze(0)
            feats = ref.forward_features(x)
            pre_logits, probs = ref.forward_head(feats, pre_logits=True)[0], ref.forward_head(feats)[0].softmax(0)
        size = specs[arch][0]
        assert info["image_size"] == [size, size] and info["num_classes"] == 10
        assert info["prefix_tokens"] == {
            "class": 1,
            "distillation": int("distilled" in arch),
            "registers": 4 if "reg4" in arch else 0,
        }
        close(embed["results"][0]["embedding"], pre_logits)
        predictions = classify["results"][0]["predictions"]
        assert predictions[0]["index"] == int(probs.argmax())
        scores = torch.zeros(10)
        for p in predictions:
            scores[p["index"]] = p["score"]
        close(scores, probs)
