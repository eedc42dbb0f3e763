"""Fixtures for the HTTP tests: tiny random native checkpoints, real photos, and a running app.

The engine tests' tests/conftest.py has function-scoped fixtures; these are session / module scoped so the
whole HTTP suite loads its models a handful of times only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from http_support import photo, save_tiny, settings_for, wait_ready
from PIL import Image

from app.http.factory import create_app


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "tiny": save_tiny(root / "tiny.safetensors"),
        "other": save_tiny(root / "other.safetensors", seed=1, num_classes=5, crop=False),
        "headless": save_tiny(root / "headless.safetensors", seed=2, num_classes=0),
    }


@pytest.fixture(scope="session")
def real_photos() -> dict[str, Image.Image]:
    return {n: photo(n).convert("RGB") for n in ("chelsea", "astronaut", "coffee", "china")}


@pytest.fixture(scope="module")
def client(checkpoints) -> Iterator[TestClient]:
    """The real app on three tiny models, with the default process pool for decoding."""
    settings = settings_for(checkpoints, decode_pool="process", decode_workers=2, jpeg_draft=False)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c
