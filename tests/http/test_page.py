"""The web page (GET /) in a real browser against the real server.

The server is `python -m app` (real uvicorn on loopback) with two small random native checkpoints and an
API key; the browser is Debian's chromium driven by Playwright (no browser download). The browser tests
skip when /usr/bin/chromium or the playwright package is missing; CI installs both:

    apt-get install -y chromium
    pip install -e '.[test]'        # brings playwright; never run `playwright install`

The page's Content-Security-Policy forbids eval, so the waits poll `page.evaluate` (which CSP does not
govern) rather than `wait_for_function` (which would need 'unsafe-eval').
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app import visuals
from app.checkpoints import native
from app.model import VisionTransformer, ViTConfig
from app.preprocess import PreprocessConfig, seen_region

CHROMIUM = Path(os.environ.get("VIT_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "page-test-key"
DIGITS = [f"digit {d}" for d in range(10)]
WIDE = [f"thing {k}" for k in range(5)]


# ---------------------------------------------------------------------------------------------- the server


def write_checkpoint(path: Path, config: ViTConfig, preprocess: PreprocessConfig, labels: list[str], seed: int) -> None:
    """A seeded random ViT whose attention is not flat (scaled qkv), so heatmaps have a clear peak."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = VisionTransformer(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if name.endswith("attn.qkv.weight"):
                p.mul_(3.0)
    native.save(path, config, net.state_dict(), preprocess, labels)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m app` on three models: "digits" (64x64, patch 8, centre crop), "wide" (48x48, patch 16,
    no crop) and "plain" (32x32, no classification head)."""
    root = tmp_path_factory.mktemp("page-models")
    base = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64}
    write_checkpoint(
        root / "digits.safetensors",
        ViTConfig.from_dict({**base, "image_size": [64, 64], "patch_size": 8, "num_classes": 10}),
        PreprocessConfig(resize=72, crop=(64, 64), interpolation="bicubic"),
        DIGITS,
        seed=3,
    )
    write_checkpoint(
        root / "wide.safetensors",
        ViTConfig.from_dict({**base, "image_size": [48, 48], "patch_size": 16, "num_classes": 5}),
        PreprocessConfig(resize=(48, 48), interpolation="bilinear"),
        WIDE,
        seed=4,
    )
    write_checkpoint(
        root / "plain.safetensors",
        ViTConfig.from_dict({**base, "image_size": [32, 32], "patch_size": 8, "num_classes": 0}),
        PreprocessConfig(resize=(32, 32)),
        [],
        seed=5,
    )
    port = free_port()
    command = [
        sys.executable, "-m", "app",
        "--model", f"digits={root / 'digits.safetensors'}",
        "--model", f"wide={root / 'wide.safetensors'}",
        "--model", f"plain={root / 'plain.safetensors'}",
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
        "--api-key", API_KEY, "--decode-workers", "1", "--decode-pool", "thread", "--log-level", "warning",
    ]  # fmt: skip
    with private_data_dir() as data:
        yield from run_server([*command, "--data-dir", str(data)], root / "server.log", port)


@contextlib.contextmanager
def private_data_dir() -> Iterator[Path]:
    """The collections' PostgreSQL (the page lists collections) in a folder of its own outside pytest's tmp root:
    as root, pgserver opens the parent folders to its `pgserver` user, and never the user's own data folder."""
    folder = Path(tempfile.mkdtemp(prefix="vitserve-page-"))
    try:
        yield folder / "data"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_server(command: list[str], log: Path, port: int) -> Iterator[str]:
    """Start `command`, wait for /readyz, yield the base URL, stop it (SIGTERM, then SIGKILL) afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready within 120 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def api(server: str, method: str, path: str, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{server}{path}", headers=headers, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def chelsea_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path, "JPEG", quality=92)
    return path


# ---------------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A Playwright page on the app, with the console and CSP violations recorded."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1440, "height": 1000})
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("console", self._console)
        self.page.goto(url)

    def _console(self, message) -> None:
        text = message.text
        # failed API calls that the page reports in its banner also appear as console errors; keep the rest
        if message.type == "error" and "Failed to load resource" not in text:
            self.problems.append(f"console: {text}")
        if "Content Security Policy" in text:
            self.problems.append(f"CSP: {text}")

    def js(self, expression: str):
        return self.page.evaluate(expression)

    def wait(self, expression: str, timeout: float = 60.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > deadline:
                banner = self.js(
                    "document.querySelector('#error').hidden ? '' : document.querySelector('#error').innerText"
                )
                raise AssertionError(f"timed out waiting for {what or expression}; banner: {banner!r}")
            time.sleep(0.05)

    def enter_key(self, key: str, press: str = "Tab") -> None:
        field = self.page.locator("#api-key")
        field.fill(key)
        field.press(press)  # leaving the field (a change event) or Enter (the form's submit) commits it

    def wait_models(self) -> None:
        self.wait("window.vitserve.model !== null && !document.querySelector('#model-select').disabled", what="models")

    def error_text(self) -> str:
        return self.js(
            "document.querySelector('#error').hidden ? '' : document.querySelector('#error-message').textContent"
        )

    def wait_results(self, name: str) -> None:
        """Predictions, heatmap and distance plot of the image called `name` are all on screen."""
        self.wait(
            f"""(() => {{
              const s = window.vitserve;
              return s.image && s.image.name === {name!r}
                && document.querySelectorAll('#predictions .bar-item').length > 0
                && document.querySelector('#heatmap').dataset.drawn === '1'
                && !document.querySelector('#distance-plot').hidden
                && document.querySelector('#distance-plot').naturalWidth > 0
                && !document.querySelector('#pred-status').classList.contains('busy')
                && !document.querySelector('#att-status').classList.contains('busy')
                && !document.querySelector('#dist-status').classList.contains('busy');
            }})()""",
            what=f"results for {name}",
        )

    def bars(self) -> list[tuple[str, str]]:
        return self.js(
            "[...document.querySelectorAll('#predictions .bar-item')]"
            ".map(li => [li.querySelector('.bar-label').textContent, li.querySelector('.bar-value').textContent])"
        )

    def canvas_png(self, selector: str) -> np.ndarray:
        url = self.js(f"document.querySelector({selector!r}).toDataURL('image/png')")
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, server) -> Iterator[Page]:
    p = Page(browser, server + "/")
    yield p
    p.close()


def lut_values(rgb: np.ndarray) -> np.ndarray:
    """Each RGB pixel -> the [0, 1] position of the nearest viridis entry (inverting the colour map)."""
    lut = visuals.colormap_lut().astype(np.int32)
    d = ((rgb[..., None, :3].astype(np.int32) - lut) ** 2).sum(-1)
    return d.argmin(-1) / 255.0


# ---------------------------------------------------------------------------------------------- page files (no browser)


def test_the_page_and_its_files_are_served_without_a_key(server):
    page = api(server, "GET", "/", key=None)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for src in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        asset = api(server, "GET", src, key=None)
        assert asset.status_code == 200, src
    assert api(server, "GET", "/static/app.js", key=None).headers["content-type"].startswith("text/javascript")
    colormaps = api(server, "GET", "/static/colormaps.json", key=None).json()
    assert np.array_equal(np.asarray(colormaps["colormaps"]["viridis"]), visuals.colormap_table("viridis"))
    missing = api(server, "GET", "/static/..%2Fvisuals.py", key=None)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


# ---------------------------------------------------------------------------------------------- browser tests


def test_missing_and_wrong_api_key_are_readable_then_the_right_one_works(page, server):
    expected = api(server, "GET", "/v1/models", key=None).json()["error"]
    page.wait("!document.querySelector('#error').hidden", what="the 401 banner")
    assert page.error_text() == expected["message"]
    assert expected["code"] in page.js("document.querySelector('#error-code').textContent")

    page.page.click("#error-close")
    assert page.error_text() == ""
    page.enter_key("not-the-key")
    page.wait("!document.querySelector('#error').hidden", what="the banner again")
    assert "unauthorized" in page.js("document.querySelector('#error-code').textContent")
    assert page.error_text() == api(server, "GET", "/v1/models", key="not-the-key").json()["error"]["message"]

    page.enter_key(API_KEY, press="Enter")
    page.wait_models()
    assert page.js("document.querySelector('#error').hidden")
    names = page.js("[...document.querySelectorAll('#model-select option')].map(o => o.value)")
    assert names == [m["name"] for m in api(server, "GET", "/v1/models").json()["models"]]
    assert not page.problems, page.problems


def test_a_photo_shows_top5_heatmap_mosaic_and_distance(page, server, chelsea_jpeg):
    page.enter_key(API_KEY)
    page.wait_models()
    page.page.set_input_files("#file-input", str(chelsea_jpeg))
    page.wait_results("chelsea.jpg")
    page.wait("document.querySelector('#mosaic').naturalWidth > 0", what="the mosaic")

    # five bars: the labels and percentages the API gives for the same file, highest first
    upload = {"images": ("chelsea.jpg", chelsea_jpeg.read_bytes(), "image/jpeg")}
    predictions = api(server, "POST", "/v1/classify?model=digits&top_k=5", files=upload).json()["results"][0]
    bars = page.bars()
    assert [label for label, _ in bars] == [p["label"] for p in predictions["predictions"]]
    for (_, shown), p in zip(bars, predictions["predictions"], strict=True):
        assert re.fullmatch(r"<?\d+\.\d%", shown)
        if not shown.startswith("<"):
            assert abs(float(shown[:-1]) - 100 * p["score"]) <= 0.051
    widths = page.js("[...document.querySelectorAll('.bar-fill')].map(b => parseFloat(b.style.width))")
    assert widths == sorted(widths, reverse=True) and widths[0] > 0

    # beside the classes, compactly: the embedding of the same file
    page.wait("document.querySelector('#embed-strip').dataset.drawn === '1'", what="the embedding strip")
    embedded = api(server, "POST", "/v1/embed?model=digits", files=upload).json()
    norm = float(np.linalg.norm(embedded["results"][0]["embedding"]))
    assert page.js("document.querySelector('#embed-card').classList.contains('compact')") is True
    assert page.js("document.querySelector('#embed-dim').textContent") == str(embedded["dim"])
    assert float(page.js("document.querySelector('#embed-norm').textContent")) == pytest.approx(norm, rel=1e-4)

    # the heatmap: the API's map, coloured with viridis, smoothly over the crop the model saw, dimmed outside
    attention = api(server, "POST", "/v1/attention?model=digits", files=upload).json()["results"][0]
    heatmap = np.asarray(attention["heatmap"])
    gh, gw = attention["grid"]
    assert np.allclose(np.asarray(page.js("window.vitserve.attention.heatmap")), heatmap, atol=1e-4)
    assert page.js("document.querySelector('#att-method').dataset.method") == attention["method"] == "rollout"
    canvas = page.canvas_png("#heatmap")
    photo = Image.open(chelsea_jpeg)
    assert canvas.shape[:2] == (photo.height, photo.width)
    box = seen_region(photo.width, photo.height, PreprocessConfig(resize=72, crop=(64, 64)))
    assert np.allclose(attention["region"], box)  # the crop box, which the JSON names beside the map
    assert np.allclose(page.js("window.vitserve.attention.region"), box)
    # and the page's own fallback, for a server without "region", computes the same box from ModelInfo
    assert np.allclose(page.js(f"seenRegion({photo.width}, {photo.height}, window.vitserve.model.preprocess)"), box)
    left, top, right, bottom = visuals._pixel_box(box, photo.width, photo.height)
    inside = canvas[top:bottom, left:right]
    assert (inside[..., 3] == 255).all()
    shown = lut_values(inside)
    # the page upsamples as the server's overlay does (Pillow's bicubic): equal up to the colour table's steps
    # (a value v shows as entry floor(256 v), read back as entry / 255: about one step apart already)
    expected = visuals.upsample_heatmap(heatmap, (right - left, bottom - top))
    assert np.abs(shown - expected).max() <= 3 / 255, "the canvas does not show the API's heatmap"
    y, x = np.unravel_index(shown.argmax(), shown.shape)
    ch, cw = (bottom - top) / gh, (right - left) / gw
    peak = np.unravel_index(heatmap.argmax(), heatmap.shape)
    assert (int((y + 0.5) // ch), int((x + 0.5) // cw)) == peak, "the hottest spot is not where the argmax maps"
    assert canvas[2, 2, 3] > 0 and canvas[2, 2, :3].max() == 0  # outside the crop: dimmed, not painted
    assert float(page.js("getComputedStyle(document.querySelector('#heatmap')).opacity")) == pytest.approx(0.6)

    # the opacity slider changes how strongly the heatmap covers the photo
    page.page.locator("#opacity").fill("25")
    assert float(page.js("getComputedStyle(document.querySelector('#heatmap')).opacity")) == pytest.approx(0.25)
    assert page.js("document.querySelector('#opacity-value').textContent") == "25%"

    # the mosaic and distance plot are the API's PNGs, decoded by the browser
    grid = api(server, "GET", "/v1/models/digits").json()["grid"]
    mosaic = Image.open(io.BytesIO(api(server, "GET", "/v1/models/digits/position-similarity?format=png").content))
    assert page.js(
        "[document.querySelector('#mosaic').naturalWidth, document.querySelector('#mosaic').naturalHeight]"
    ) == [
        mosaic.width,
        mosaic.height,
    ]
    assert (
        page.js("document.querySelector('#mosaic-status').textContent")
        == f"{grid[0]}\N{MULTIPLICATION SIGN}{grid[1]} positions"
    )
    assert page.js("document.querySelector('#distance-plot').naturalWidth") > 300
    assert page.error_text() == ""
    assert not page.problems, page.problems

    # class-token attention of one layer and head: the page asks for exactly that
    page.page.select_option("#method-select", "cls")
    assert page.js("document.querySelector('#layer-select').disabled") is False
    page.page.select_option("#layer-select", "0")
    page.page.select_option("#head-select", "1")
    page.wait(
        "window.vitserve.attention && window.vitserve.attention.method === 'cls'"
        " && !document.querySelector('#att-status').classList.contains('busy')",
        what="class-token attention",
    )
    cls = api(server, "POST", "/v1/attention?model=digits&method=cls&layer=0&head=1", files=upload).json()
    shown_cls = np.asarray(page.js("window.vitserve.attention.heatmap"))
    assert np.allclose(shown_cls, np.asarray(cls["results"][0]["heatmap"]), atol=1e-4)
    assert not np.allclose(shown_cls, heatmap, atol=1e-3)
    assert "Layer 1" in page.js("document.querySelector('#att-status').textContent")


def draw(page: Page, points: list[tuple[float, float]]) -> None:
    """One mouse stroke through `points`, given in the drawing canvas's own 280 x 280 pixels."""
    box = page.page.locator("#draw-canvas").bounding_box()
    scale = box["width"] / 280
    at = [(box["x"] + x * scale, box["y"] + y * scale) for x, y in points]
    page.page.mouse.move(*at[0])
    page.page.mouse.down()
    for x, y in at[1:]:
        page.page.mouse.move(x, y, steps=15)
    page.page.mouse.up()


def test_drawing_a_digit_classifies_it(page, server):
    page.enter_key(API_KEY)
    page.wait_models()
    page.page.click("#tab-draw")
    assert page.js("document.querySelector('#panel-draw').hidden") is False
    draw(page, [(70, 60), (210, 60), (120, 230)])  # a "7": the top bar, then the diagonal
    drawn = page.canvas_png("#draw-canvas")
    ink = (drawn[..., :3] < 60).all(-1)
    assert 0.03 < ink.mean() < 0.4  # a thick black stroke on white
    assert (drawn[5, 5, :3] == 255).all()

    page.page.click("#draw-classify")
    page.wait_results("drawing.png")
    bars = page.bars()
    assert len(bars) == 5 and all(label in DIGITS for label, _ in bars)
    png = base64.b64decode(page.js("document.querySelector('#draw-canvas').toDataURL('image/png')").split(",", 1)[1])
    answer = api(server, "POST", "/v1/classify?model=digits&top_k=5", files={"images": ("d.png", png, "image/png")})
    assert bars[0][0] == answer.json()["results"][0]["predictions"][0]["label"]
    assert page.error_text() == ""
    assert not page.problems, page.problems

    page.page.click("#draw-clear")
    assert (page.canvas_png("#draw-canvas")[..., :3] == 255).all()


def test_a_corrupt_upload_shows_the_api_message(page, server):
    page.enter_key(API_KEY)
    page.wait_models()
    junk = b"this is not a JPEG at all, just some text"
    page.page.set_input_files("#file-input", files=[{"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": junk}])
    page.wait("!document.querySelector('#error').hidden", what="the error banner")
    expected = api(server, "POST", "/v1/classify?model=digits", files={"images": ("broken.jpg", junk, "image/jpeg")})
    assert expected.status_code == 400
    page.wait(f"document.querySelector('#error-message').textContent === {expected.json()['error']['message']!r}")
    assert "invalid_image" in page.js("document.querySelector('#error-code').textContent")
    page.wait("document.querySelector('#stage').hidden", what="the broken preview to go")
    assert page.bars() == []
    assert page.js("document.querySelector('#heatmap').dataset.drawn") is None


def test_the_model_selector_switches_every_view(page, server, chelsea_jpeg):
    page.enter_key(API_KEY)
    page.wait_models()
    page.page.set_input_files("#file-input", str(chelsea_jpeg))
    page.wait_results("chelsea.jpg")
    page.page.select_option("#model-select", "wide")
    page.wait(
        "window.vitserve.model.name === 'wide'"
        " && document.querySelector('#mosaic-status').textContent === '3\u00d73 positions'"
        " && [...document.querySelectorAll('.bar-label')].every(b => b.textContent.startsWith('thing'))",
        what="the wide model's views",
    )
    page.wait_results("chelsea.jpg")
    assert len(page.bars()) == 5
    assert page.js("document.querySelectorAll('#layer-select option').length") == 2
    assert page.js("document.querySelectorAll('#head-select option').length") == 3  # mean + 2 heads
    # "wide" resizes without cropping: the heatmap covers the whole photo, nothing is dimmed
    page.wait("window.vitserve.attention && window.vitserve.attention.grid[0] === 3", what="the 3x3 heatmap")
    canvas = page.canvas_png("#heatmap")
    assert (canvas[..., 3] == 255).all()
    assert page.error_text() == ""
    assert not page.problems, page.problems


def test_a_model_without_a_head_shows_its_embedding_and_attention(page, server, chelsea_jpeg):
    """A headless model: the embedding card (family, pooling, dimension, L2 norm, the vector as a strip, a copy
    button) stands where the top classes would be, and the attention map names the method the server used."""
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.enter_key(API_KEY)
    page.wait_models()
    page.page.select_option("#model-select", "plain")
    page.wait("window.vitserve.model.name === 'plain'")
    page.page.set_input_files("#file-input", str(chelsea_jpeg))
    page.wait(
        "document.querySelector('#heatmap').dataset.drawn === '1'"
        " && document.querySelector('#distance-plot').naturalWidth > 0"
        " && document.querySelector('#embed-strip').dataset.drawn === '1'"
        " && !document.querySelector('#embed-status').classList.contains('busy')"
        " && !document.querySelector('#att-status').classList.contains('busy')",
        what="embedding and attention of the headless model",
    )
    info = api(server, "GET", "/v1/models/plain").json()
    assert info["num_classes"] == 0
    upload = {"images": ("chelsea.jpg", chelsea_jpeg.read_bytes(), "image/jpeg")}
    embedded = api(server, "POST", "/v1/embed?model=plain&pool=default", files=upload).json()
    vector = np.asarray(embedded["results"][0]["embedding"])
    assert embedded["dim"] == info["embedding_dim"] == vector.size

    # no top-5: the predictions card is gone and the embedding card says why
    assert page.bars() == []
    assert page.js("document.querySelector('#predictions-card').hidden") is True
    assert page.js("document.querySelector('#predictions-card').offsetParent") is None
    assert "no classification head" in page.js("document.querySelector('#embed-about').textContent")

    def text(selector: str) -> str:
        return page.js(f"document.querySelector({selector!r}).textContent")

    assert text("#embed-dim") == str(info["embedding_dim"])
    assert text("#embed-family") == info["family"]
    assert info["pool"] in page.js("document.querySelector('#embed-pool').title")
    assert float(text("#embed-norm")) == pytest.approx(float(np.linalg.norm(vector)), rel=1e-4)
    assert np.allclose(page.js("window.vitserve.embedding.vector"), vector, atol=1e-6)

    # the strip: bars both sides of the zero line, as many as the vector has values (it is narrower than the strip)
    strip = page.canvas_png("#embed-strip")
    assert strip.shape[1] >= vector.size
    painted = strip[..., 3] > 0
    assert painted.any(axis=0).mean() > 0.5
    teal = (np.abs(strip[..., :3].astype(int) - [0x21, 0x91, 0x8C]).sum(-1) < 10) & painted
    purple = (np.abs(strip[..., :3].astype(int) - [0x44, 0x01, 0x54]).sum(-1) < 10) & painted
    mid = strip.shape[0] // 2
    assert (vector > 0).any() == teal[:mid].any() and (vector < 0).any() == purple[mid:].any()

    # copy as JSON: the same numbers on the clipboard
    page.page.click("#embed-copy")
    page.wait("document.querySelector('#embed-copied').textContent.startsWith('copied')", what="the copy")
    copied = json.loads(page.js("navigator.clipboard.readText()"))
    assert np.allclose(copied, vector, atol=1e-6)

    # the attention card names the method the server answered with
    method = api(server, "POST", "/v1/attention?model=plain", files=upload).json()["results"][0]["method"]
    assert page.js("document.querySelector('#att-method').dataset.method") == method
    assert page.js("document.querySelector('#att-method').hidden") is False
    assert method in text("#att-method")

    page.page.set_viewport_size({"width": 1280, "height": 1000})
    page.page.wait_for_timeout(200)  # the strip redraws at its new width
    page.page.screenshot(path="/tmp/headless.png")
    assert page.error_text() == ""
    assert not page.problems, page.problems


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def offline_page(browser, url: str, width: int = 1280):
    """A page whose every request that leaves the machine is aborted (and recorded)."""
    from urllib.parse import urlparse

    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    blocked: list[str] = []

    def only_loopback(route) -> None:
        url = route.request.url
        if url.startswith(("data:", "blob:")) or urlparse(url).hostname in LOOPBACK:
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    page.route("**/*", only_loopback)
    page.goto(url)
    return context, page, blocked


def test_the_api_docs_render_with_the_network_blocked(browser, server):
    """/docs (Swagger UI) and /redoc list the operations with nothing fetched from outside the machine, and
    /docs offers a file upload for the image routes."""
    context, page, blocked = offline_page(browser, server + "/docs")
    try:
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.dataset.path)")
        for path in ("/healthz", "/readyz", "/v1/classify", "/v1/embed", "/v1/attention", "/v2/models/{name}/infer"):
            assert path in paths, paths
        page.click("#operations-v1-classify_v1_classify_post .opblock-summary")
        page.click("#operations-v1-classify_v1_classify_post .try-out__btn")
        page.wait_for_selector("#operations-v1-classify_v1_classify_post .opblock-body select", timeout=10_000)
        types = page.eval_on_selector_all(
            "#operations-v1-classify_v1_classify_post .opblock-body select.content-type option, "
            "#operations-v1-classify_v1_classify_post .body-param-content-type select option",
            "els => els.map(e => e.value)",
        )
        assert {"multipart/form-data", "image/png", "application/json"} <= set(types), types
        page.select_option(
            "#operations-v1-classify_v1_classify_post .body-param-content-type select", "multipart/form-data"
        )
        page.wait_for_selector("#operations-v1-classify_v1_classify_post input[type=file]", timeout=10_000)
        assert not blocked, blocked
        page.goto(server + "/redoc")
        page.wait_for_selector("[data-section-id^='operation/']", timeout=30_000)
        sections = page.eval_on_selector_all("[data-section-id^='operation/']", "els => els.length")
        assert sections >= 19
        # ReDoc's sidebar credits its maker with a logo from its CDN: an image that does not load, nothing else
        assert set(blocked) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}, blocked
    finally:
        context.close()


def test_the_attention_controls_show_their_whole_labels_at_1280px(browser, server):
    context, page, _ = offline_page(browser, server + "/")
    try:
        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Tab")
        page.wait_for_selector("#layer-select option", state="attached", timeout=30_000)
        widths = page.evaluate(
            """[...document.querySelectorAll('.controls select')].map(s => {
                const style = getComputedStyle(s);
                const ctx = document.createElement('canvas').getContext('2d');
                ctx.font = `${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
                const text = Math.max(...[...s.options].map(o => ctx.measureText(o.text).width));
                const room = s.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight) - 20;
                return [s.id, Math.ceil(text), Math.floor(room)];
            })"""
        )
        assert len(widths) == 3
        for name, text, room in widths:
            assert text <= room, f"{name}: its longest option needs {text} px, it has {room} (the arrow aside)"
    finally:
        context.close()


def test_screenshot_for_people(page, chelsea_jpeg, tmp_path_factory):
    """Not an assertion about looks: a screenshot of the full page, kept for a person to look at."""
    page.enter_key(API_KEY)
    page.wait_models()
    page.page.set_input_files("#file-input", str(chelsea_jpeg))
    page.wait_results("chelsea.jpg")
    page.wait("document.querySelector('#mosaic').naturalWidth > 0")
    target = Path(os.environ.get("VIT_PAGE_SCREENSHOT", tmp_path_factory.mktemp("screens") / "page.png"))
    page.page.screenshot(path=str(target), full_page=True)
    assert Image.open(target).size[0] == 1440


def test_a_file_the_browser_cannot_show_gets_the_servers_overlay(page, server, chelsea_jpeg, tmp_path):
    """Chromium does not decode TIFF; the server does, so the page shows the server's PNG overlay instead."""
    tiff = tmp_path / "chelsea.tiff"
    Image.open(chelsea_jpeg).save(tiff, "TIFF")
    page.enter_key(API_KEY)
    page.wait_models()
    page.page.set_input_files("#file-input", str(tiff))
    page.wait(
        "document.querySelectorAll('#predictions .bar-item').length === 5"
        " && document.querySelector('#input-image').dataset.overlay === '1'"
        " && document.querySelector('#input-image').naturalWidth > 0"
        " && !document.querySelector('#stage').hidden",
        what="predictions and the server-drawn overlay",
    )
    overlay = api(
        server, "POST", "/v1/attention?model=digits&format=png", files={"images": ("c.tiff", tiff.read_bytes())}
    )
    size = page.js(
        "[document.querySelector('#input-image').naturalWidth, document.querySelector('#input-image').naturalHeight]"
    )
    assert size == list(Image.open(io.BytesIO(overlay.content)).size)
    assert "drawn by the server" in page.js("document.querySelector('#att-status').textContent")
    assert page.error_text() == ""


def test_similar_images_add_search_and_show_thumbnails(page, server):
    """The "Similar images" view: make a collection, add three pictures through the page, give one of them
    again, and see its neighbours as thumbnails with scores and metadata, the picture itself first."""
    page.enter_key(API_KEY)
    page.wait_models()
    page.page.fill("#collection-name", "page-pics")
    page.page.click("#collection-create")
    page.wait("document.querySelector('#collection-select').value === 'page-pics'", what="the new collection")
    rng = np.random.default_rng(0)
    pictures = {}
    for name in ("red.png", "noise.png", "stripes.png"):
        a = np.zeros((80, 60, 3), np.uint8)
        if name == "red.png":
            a[..., 0] = 220
        elif name == "noise.png":
            a = (rng.random((80, 60, 3)) * 255).astype(np.uint8)
        else:
            a[::8] = 255
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        pictures[name] = buf.getvalue()
    idle = "!document.querySelector('#similar-status').classList.contains('busy')"
    for n, (name, data) in enumerate(pictures.items(), start=1):
        page.page.set_input_files("#file-input", files=[{"name": name, "mimeType": "image/png", "buffer": data}])
        page.wait(f"window.vitserve.image && window.vitserve.image.name === {name!r} && {idle}", what=name)
        page.wait("!document.querySelector('#similar-add').disabled", what="the add button")
        page.page.click("#similar-add")
        page.wait(f"document.querySelectorAll('#similar li.match').length === {n} && {idle}", what=f"{n} matches")
    assert api(server, "GET", "/v1/collections/page-pics").json()["count"] == 3

    data = pictures["noise.png"]
    page.page.set_input_files("#file-input", files=[{"name": "again.png", "mimeType": "image/png", "buffer": data}])
    page.wait(
        "window.vitserve.image.name === 'again.png' && document.querySelectorAll('#similar li.match').length === 3"
        " && [...document.querySelectorAll('#similar li.match img')].every(i => i.complete && i.naturalWidth > 0)"
        f" && {idle}",
        what="three thumbnails",
    )
    matches = page.js(
        "[...document.querySelectorAll('#similar li.match')].map(li => [li.querySelector('strong').textContent,"
        " li.querySelector('.score').textContent, li.querySelector('.meta').textContent,"
        " li.querySelector('img').naturalWidth, li.querySelector('img').naturalHeight])"
    )
    assert json.loads(matches[0][2])["filename"] == "noise.png"
    assert float(matches[0][1]) == pytest.approx(1.0, abs=1e-3)
    assert all(max(m[3], m[4]) == 128 for m in matches), matches  # the stored thumbnails, longest side 128
    scores = [float(m[1]) for m in matches]
    assert scores == sorted(scores, reverse=True)
    ids = [m[0] for m in matches]
    expected = api(
        server, "POST", "/v1/collections/page-pics/search?k=8", files={"images": ("q.png", data, "image/png")}
    )
    assert ids == [r["id"] for r in expected.json()["results"]]
    assert page.error_text() == ""
    assert not page.problems, page.problems


def bundled_model_folder() -> Path | None:
    """The bundled default's folder in the repository's models/, once the training helper has put one there."""
    models = Path(__file__).resolve().parents[2] / "models"
    default = models / "DEFAULT"
    names = [default.read_text().strip()] if default.is_file() else sorted(p.name for p in models.glob("*"))
    for folder in (models / name for name in names):
        if folder.is_dir() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.pt*"))):
            return folder
    return None


@pytest.fixture(scope="module")
def bundled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = bundled_model_folder()
    if folder is None:
        pytest.skip("no bundled model in models/ yet")
    port = free_port()
    command = [
        sys.executable, "-m", "app", "--models-dir", str(folder.parent), "--model", folder.name,
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
        "--decode-workers", "1", "--decode-pool", "thread", "--log-level", "warning",
    ]  # fmt: skip
    with private_data_dir() as data:
        log = tmp_path_factory.mktemp("bundled") / "server.log"
        yield from run_server([*command, "--data-dir", str(data)], log, port)


def test_the_bundled_model_reads_a_drawn_one(browser, bundled_server):
    """The bundled digits model, served as shipped, reads a "1" drawn with the mouse."""
    page = Page(browser, bundled_server + "/")
    try:
        page.wait("window.vitserve.model !== null", what="the bundled model")
        page.page.click("#tab-draw")
        draw(page, [(140, 45), (140, 235)])
        page.page.click("#draw-classify")
        page.wait_results("drawing.png")
        top = page.bars()[0][0]
        assert re.search(r"(^|\D)1(\D|$)|\bone\b", top), f"a drawn 1 read as {top!r}: {page.bars()}"
        assert page.error_text() == ""
        assert not page.problems, page.problems
    finally:
        page.close()
