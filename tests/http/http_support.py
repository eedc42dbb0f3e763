"""Helpers for the HTTP tests (fixtures live in conftest.py): tiny checkpoints, photos, wrapped models, a client."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.checkpoints import native
from app.model import VisionTransformer, ViTConfig
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


def settings_for(checkpoints: dict[str, Path], *names: str, **kw) -> Settings:
    specs = [f"{n}={checkpoints[n]}" for n in (names or ("tiny", "other", "headless"))]
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", "float32")
    kw.setdefault("decode_workers", 1)
    kw.setdefault("decode_pool", "thread")
    return Settings(model=specs, **kw)


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout} s: {r.text}")


def rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


class Wrapped:
    """A real loaded model with an injected delay and/or fault: the forward raises for any batch holding a
    pure white image (a server fault tied to one item, so split-on-failure can be seen isolating it). With
    `sticky`, a white image is a CUDA fault that outlives its batch: every later forward raises too and
    `device_error()` reports it, as after an illegal memory access on a GPU."""

    def __init__(self, model, delay: float = 0.0, poison: bool = False, sticky: bool = False):
        self._model = model
        self.delay = delay
        self.poison = poison or sticky
        self.sticky = sticky
        self.lost: str | None = None
        self.batch_sizes: list[int] = []
        self.forwards: list[tuple[int, int]] = []  # (thread, its intra-op threads) per forward
        self.most_at_once = 0
        self._running = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def __call__(self, pixels: torch.Tensor, attentions: bool = False, layers=None):
        self.batch_sizes.append(int(pixels.shape[0]))
        with self._lock:
            self._running += 1
            self.most_at_once = max(self.most_at_once, self._running)
            self.forwards.append((threading.get_ident(), torch.get_num_threads()))
        try:
            if self.delay:
                time.sleep(self.delay)
            if self.lost:
                raise RuntimeError(self.lost)
            if self.poison and bool((pixels.flatten(1) >= 0.999).all(dim=1).any()):
                if self.sticky:
                    self.lost = "CUDA error: an illegal memory access was encountered (injected)"
                raise RuntimeError("injected fault: a white image")
            return self._model(pixels, attentions, layers)
        finally:
            with self._lock:
                self._running -= 1

    def device_error(self) -> str | None:
        return self.lost


def wrapping_loader(created: list | None = None, **kw):
    """A loader (create_app's hook) that loads with the engine, then wraps the model."""
    from app.http.loading import engine_loader

    def load(spec, settings, models_dir):
        model = Wrapped(engine_loader(spec, settings, models_dir), **kw)
        if created is not None:
            created.append(model)
        return model

    return load


@contextlib.asynccontextmanager
async def serve(app, wait: bool = True):
    """The app's lifespan plus an httpx client on it (for concurrent requests from one event loop)."""
    import asyncio

    import httpx

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://vitserve", timeout=60) as client:
            if wait:
                for _ in range(3000):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    state = app.state.vit
                    assert state.load_error is None, state.load_error
                    await asyncio.sleep(0.02)
            yield client


def metric(client_text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def white(size=(64, 48)) -> bytes:
    return encode(Image.new("RGB", size, (255, 255, 255)), "PNG")


async def asgi_call(app, method: str, path: str, headers: dict[str, str], chunks, disconnect=None) -> dict:
    """Call the ASGI app directly, feeding the body chunk by chunk (as a server streams it).

    Returns status, headers, body and how many body chunks the app pulled. `chunks` may be an async iterable (a
    slow client). With `disconnect` (an asyncio.Event), the client "goes away" when it is set, after the body has
    been sent.
    """
    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("vitserve", 80),
    }
    chunks = aiter(chunks) if hasattr(chunks, "__aiter__") else iter(chunks)
    pulled = 0
    done = False
    out: dict = {"status": None, "headers": {}, "body": b""}

    async def receive():
        nonlocal pulled, done
        if not done:
            chunk = await anext(chunks, None) if hasattr(chunks, "__anext__") else next(chunks, None)
            if chunk is not None:
                pulled += 1
                return {"type": "http.request", "body": chunk, "more_body": True}
            done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect is not None:
            await disconnect.wait()
            return {"type": "http.disconnect"}
        import asyncio

        await asyncio.Event().wait()  # a client that stays (never returns)

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    await app(scope, receive, send)
    out["pulled"] = pulled
    return out
