"""Shared fixtures: tiny random models and checkpoints written to tmp_path, real photos, a perturbation helper.

Checkpoints (all native format, every parameter perturbed so no weight is a trivial 0 or 1):
- `make_native_checkpoint(name, config=TINY, seed=0, labels=None, preprocess=None)` -> folder tmp_path/name
  holding model.safetensors (name may be nested, e.g. "models/alpha");
- `tiny_checkpoint`: folder of a 10-class tiny ViT (32x32 input, patch 8, width 32, depth 2, 2 heads);
- `tiny_headless_checkpoint`: the same without a classification head (num_classes 0);
- `tiny_models_dir`: a model repository with "alpha" (classifier) and "beta" (headless), DEFAULT -> beta.
Helpers: `perturb(module, seed=0)`, `tiny_config`, `make_tiny_vit(config=TINY, seed=0)`,
`photos` (skimage's chelsea and astronaut as PIL RGB), `pixels` (a seeded (2, 3, 32, 32) float batch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from app.checkpoints import native
from app.model import VisionTransformer, ViTConfig
from app.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig

TINY = ViTConfig(image_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=10)
TINY_PREPROCESS = PreprocessConfig(
    resize=36, crop=(32, 32), interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD
)


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add seeded noise to every parameter (LayerNorm weights and biases, heads, tokens included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return module


def tiny_vit(config: ViTConfig = TINY, seed: int = 0) -> VisionTransformer:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return perturb_(VisionTransformer(config), seed).eval()


@pytest.fixture(scope="session")
def perturb():
    return perturb_


@pytest.fixture
def tiny_config() -> ViTConfig:
    return TINY


@pytest.fixture
def make_tiny_vit():
    """`make_tiny_vit(config=TINY, seed=0)` -> a perturbed VisionTransformer in eval mode."""
    return tiny_vit


@pytest.fixture
def make_native_checkpoint(tmp_path):
    def make(
        name: str = "tiny",
        config: ViTConfig = TINY,
        seed: int = 0,
        labels: list[str] | None = None,
        preprocess: PreprocessConfig | None = None,
    ) -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        model = tiny_vit(config, seed)
        labels = labels if labels is not None else [f"label_{i}" for i in range(config.num_classes)]
        native.save(folder / "model.safetensors", config, model.state_dict(), preprocess or TINY_PREPROCESS, labels)
        return folder

    return make


@pytest.fixture
def tiny_checkpoint(make_native_checkpoint) -> Path:
    return make_native_checkpoint("tiny")


@pytest.fixture
def tiny_headless_checkpoint(make_native_checkpoint) -> Path:
    return make_native_checkpoint("tiny-headless", config=ViTConfig.from_dict({**TINY.to_dict(), "num_classes": 0}))


@pytest.fixture
def tiny_models_dir(make_native_checkpoint, tmp_path) -> Path:
    make_native_checkpoint("models/alpha", seed=1)
    make_native_checkpoint("models/beta", config=ViTConfig.from_dict({**TINY.to_dict(), "num_classes": 0}), seed=2)
    (tmp_path / "models" / "DEFAULT").write_text("beta\n")
    return tmp_path / "models"


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(data.chelsea()).convert("RGB"), Image.fromarray(data.astronaut()).convert("RGB")]


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1234))


def _bogus_huffman_table(jpeg: bytes) -> bytes:
    data = bytearray(jpeg)
    dht = data.index(b"\xff\xc4")  # marker, length (2 bytes), class/id (1), then 16 code counts
    data[dht + 5 : dht + 21] = b"\xff" * 16
    return bytes(data)


@pytest.fixture
def bogus_huffman_table():
    """jpeg bytes -> the same JPEG, complete (end marker and all), whose first Huffman table claims more codes
    than exist: its header passes every check, and every decoder (Pillow, torchvision's, nvJPEG) refuses its
    image data."""
    return _bogus_huffman_table
