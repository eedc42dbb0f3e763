"""Fixtures for the HTTP tests: tiny random native checkpoints, real photos, and a running app."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.checkpoints import native
from app.http import create_app
from app.model import ViTConfig, VisionTransformer
from app.preprocess import PreprocessConfig
from app.settings import Settings

TINY = {"image_size": [32, 32], "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64}


def save_tiny(path: Path, *, num_classes: int = 10, seed: int = 0, crop: bool = True, **overrides) -> Path:
    """A small random ViT written in our native format (what `app.train` produces), at `path`."""
    torch.manual_seed(seed)
    config = ViTConfig.from_dict({**TINY, "num_classes": num_classes, **overrides})
    net = VisionTransformer(config)
    if net.head is not None:  # a zero-initialised head would make every score equal
        torch.nn.init.normal_(net.head.weight, std=0.5)
    size = config.image_size
    preprocess = (
        PreprocessConfig(resize=size[0] + 4, crop=tuple(size), interpolation="bicubic")
        if crop
        else PreprocessConfig(resize=tuple(size), interpolation="bilinear", mean=(0.485, 0.456, 0.406))
    )
    labels = [f"label {i}" for i in range(num_classes)]
    path.parent.mkdir(parents=True, exist_ok=True)
    native.save(path, config, net.state_dict(), preprocess, labels)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "tiny": save_tiny(root / "tiny.safetensors"),
        "other": save_tiny(root / "other.safetensors", seed=1, num_classes=5, crop=False),
        "headless": save_tiny(root / "headless.safetensors", seed=2, num_classes=0),
    }


def photo(name: str) -> Image.Image:
    """Real photographs shipped with scikit-image and scikit-learn (no download)."""
    if name == "china":
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image("china.jpg"))
    from skimage import data

    return Image.fromarray(getattr(data, name)())


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    return {n: photo(n).convert("RGB") for n in ("chelsea", "astronaut", "coffee", "china")}


def settings_for(checkpoints: dict[str, Path], *names: str, **kw) -> Settings:
    specs = [f"{n}={checkpoints[n]}" for n in (names or ("tiny", "other", "headless"))]
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", "float32")
    kw.setdefault("decode_workers", 1)
    kw.setdefault("decode_pool", "thread")
    return Settings(model=specs, **kw)


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout} s: {r.text}")


@pytest.fixture(scope="module")
def client(checkpoints) -> Iterator[TestClient]:
    """The real app on three tiny models, with the default process pool for decoding."""
    settings = settings_for(checkpoints, decode_pool="process", decode_workers=2, jpeg_draft=False)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))
