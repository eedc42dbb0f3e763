"""Pictures of what the model sees: heatmap overlays, the position-similarity mosaic, the distance plot.

Pictures only: the numbers come from app/analysis.py. Everything is drawn with Pillow and numpy;
the colour maps are matplotlib's published tables, copied once into app/data/colormaps.json by
scripts/make_colormaps.py, so matplotlib is never needed at run time.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORMAPS_FILE = Path(__file__).resolve().parent / "data" / "colormaps.json"
DEFAULT_COLORMAP = "viridis"
MAX_SIDE = 1024  # overlays of very large uploads are scaled down to this longest side (aspect kept)
OUTSIDE_DIM = 0.4  # brightness kept outside the region the model saw
SUPERSAMPLE = 2  # plots are drawn this many times larger, then reduced, for smooth edges and text
BACKGROUND = (255, 255, 255)
INK = (33, 37, 41)
GRID_INK = (222, 226, 230)
MUTED_INK = (108, 117, 125)
# One colour per head (the Tableau 10 palette, then darker variants), as in the ViT paper's legend.
HEAD_COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (16, 64, 98),
    (153, 76, 8),
    (24, 88, 24),
    (120, 22, 22),
    (83, 58, 106),
    (13, 107, 117),
)

Box = tuple[float, float, float, float]


# ---------------------------------------------------------------------------------------------- colour maps


@cache
def colormap_table(name: str = DEFAULT_COLORMAP) -> np.ndarray:
    """(256, 3) float64 RGB table in [0, 1], exactly as published (matplotlib's `ListedColormap.colors`)."""
    tables = json.loads(COLORMAPS_FILE.read_text())["colormaps"]
    if name not in tables:
        raise ValueError(f"unknown colour map {name!r}; use one of {sorted(tables)}")
    table = np.asarray(tables[name], dtype=np.float64)
    table.setflags(write=False)
    return table


@cache
def colormap_lut(name: str = DEFAULT_COLORMAP) -> np.ndarray:
    """(256, 3) uint8 RGB table, converted as matplotlib does for `bytes=True` (truncating x * 255)."""
    lut = (colormap_table(name) * 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def apply_colormap(values: np.ndarray, name: str = DEFAULT_COLORMAP) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,)), indexing the table as matplotlib does."""
    lut = colormap_lut(name)
    index = np.floor(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * len(lut)).astype(np.int64)
    return lut[np.minimum(index, len(lut) - 1)]


# ---------------------------------------------------------------------------------------------- helpers


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at `size` pixels (FreeType build), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or built without FreeType
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _vertical_text(text: str, font, fill: tuple[int, int, int]) -> Image.Image:
    """`text` drawn on a transparent strip and turned 90 degrees (reading bottom to top), for y-axis titles."""
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    strip = Image.new("RGBA", (right - left + 4, bottom - top + 4), (0, 0, 0, 0))
    ImageDraw.Draw(strip).text((2 - left, 2 - top), text, font=font, fill=(*fill, 255))
    return strip.rotate(90, expand=True)


def _nice_step(span: float, target_ticks: int = 5) -> float:
    """A 1, 2 or 5 times a power of ten step that cuts `span` into about `target_ticks` intervals."""
    raw = max(span, 1e-12) / target_ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def _format_tick(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f}"


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


# ---------------------------------------------------------------------------------------------- overlay


def _capped(image: Image.Image, box: Box, max_side: int) -> tuple[Image.Image, Box]:
    """The image scaled so its longest side is at most `max_side`, and the box scaled with it."""
    scale = min(1.0, max_side / max(image.size))
    if scale >= 1.0:
        return image, box
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    sx, sy = size[0] / image.width, size[1] / image.height
    left, top, right, bottom = box
    return image.resize(size, Image.Resampling.LANCZOS), (left * sx, top * sy, right * sx, bottom * sy)


def _pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """The float box rounded to whole pixels and clipped to the image (at least one pixel each way)."""
    left, top, right, bottom = (round(v) for v in box)
    left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
    right, bottom = min(max(right, left + 1), width), min(max(bottom, top + 1), height)
    return left, top, right, bottom


def upsample_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(gh, gw) map -> (h, w) for size=(w, h): bicubic, each cell's value at its cell's centre, kept in [0, 1]."""
    grid = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32), mode="F")
    smooth = np.asarray(grid.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip(smooth, 0.0, 1.0)  # bicubic overshoots a little near sharp peaks


def overlay_png(
    image: Image.Image,
    heatmap: np.ndarray,
    box: Box,
    alpha: float = 0.5,
    *,
    colormap: str = DEFAULT_COLORMAP,
    max_side: int = MAX_SIDE,
) -> bytes:
    """The heatmap (gh, gw) in [0, 1] coloured and blended onto the region `box` of `image`, as PNG RGB.

    `box` = (left, top, right, bottom) in the image's pixels: the region the model saw (the crop box).
    Outside it the image is dimmed, so one sees at once what the model did not look at. The PNG has
    the image's size, unless its longest side passes `max_side`, then it is scaled down (aspect kept).
    """
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise ValueError(f"heatmap must be a non-empty (gh, gw) array, got shape {heatmap.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    image, box = _capped(image.convert("RGB"), box, max_side)
    base = np.asarray(image, dtype=np.float32)
    out = base * OUTSIDE_DIM
    left, top, right, bottom = _pixel_box(box, image.width, image.height)
    colours = apply_colormap(upsample_heatmap(heatmap, (right - left, bottom - top)), colormap)
    inside = base[top:bottom, left:right]
    out[top:bottom, left:right] = (1.0 - alpha) * inside + alpha * colours.astype(np.float32)
    return _png(Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB"))


# ---------------------------------------------------------------------------------------------- mosaic


def _colour_bar(height: int, vmin: float, vmax: float, colormap: str) -> tuple[Image.Image, int]:
    """A vertical colour bar `height` pixels tall, min / middle / max labelled, with its title.

    Returns the panel and its margin: the bar starts `margin` pixels below the panel's top, so the
    labels at its ends are never cut.
    """
    font = _font(14)
    bar_w, gap, margin = 18, 6, 9
    values = np.linspace(1.0, 0.0, height, dtype=np.float64)[:, None].repeat(bar_w, axis=1)
    bar = Image.fromarray(apply_colormap(values, colormap), mode="RGB")
    labels = [f"{v:.2f}" for v in (vmax, (vmin + vmax) / 2, vmin)]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, s, font)[0] for s in labels)
    title = _vertical_text("cosine similarity", font, INK)
    panel = Image.new("RGB", (bar_w + 2 + gap + label_w + gap + title.width, height + 2 * margin), BACKGROUND)
    panel.paste(bar, (1, margin))
    draw = ImageDraw.Draw(panel)
    draw.rectangle((0, margin - 1, bar_w + 1, margin + height), outline=MUTED_INK)  # around, not over, the bar
    for label, y in zip(labels, (0, height // 2, height - 1), strict=True):
        draw.line((bar_w + 2, margin + y, bar_w + 2 + gap // 2, margin + y), fill=INK)
        draw.text((bar_w + 2 + gap, margin + y), label, font=font, fill=INK, anchor="lm")
    panel.paste(title, (panel.width - title.width, margin + (height - title.height) // 2), title)
    return panel, margin


def similarity_mosaic_png(
    similarity: np.ndarray,
    grid: tuple[int, int],
    *,
    colormap: str = DEFAULT_COLORMAP,
    target_side: int = 720,
) -> bytes:
    """The ViT paper's position-embedding figure: a gh x gw mosaic of gh x gw tiles, with a colour bar.

    Tile (i, j) shows the cosine similarity of patch position (i, j) to every position. Tiles are
    enlarged with nearest-neighbour so small grids stay visible, separated by thin white lines, and
    coloured on one scale from the matrix's minimum to its maximum, which the colour bar states.
    """
    gh, gw = int(grid[0]), int(grid[1])
    n = gh * gw
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.shape != (n, n):
        raise ValueError(f"similarity must be ({n}, {n}) for grid {gh}x{gw}, got {similarity.shape}")
    vmin, vmax = float(similarity.min()), float(similarity.max())
    values = (similarity - vmin) / (vmax - vmin) if vmax > vmin else np.ones_like(similarity)

    cell = max(1, target_side // (max(gh, gw) ** 2))  # screen pixels per position inside a tile
    sep = 2 if cell * max(gh, gw) >= 24 else 1
    tile_h, tile_w = gh * cell, gw * cell
    mosaic_w, mosaic_h = gw * tile_w + (gw - 1) * sep, gh * tile_h + (gh - 1) * sep
    mosaic = np.full((mosaic_h, mosaic_w, 3), 255, dtype=np.uint8)
    tiles = apply_colormap(values.reshape(gh, gw, gh, gw), colormap)  # (i, j, row, col, 3)
    for i in range(gh):
        for j in range(gw):
            tile = tiles[i, j].repeat(cell, axis=0).repeat(cell, axis=1)
            y, x = i * (tile_h + sep), j * (tile_w + sep)
            mosaic[y : y + tile_h, x : x + tile_w] = tile

    return _png(_frame_mosaic(Image.fromarray(mosaic, mode="RGB"), (gh, gw), vmin, vmax, colormap))


def _frame_mosaic(mosaic: Image.Image, grid: tuple[int, int], vmin: float, vmax: float, colormap: str) -> Image.Image:
    """The mosaic with its axis titles (input patch row / column), tile indices and the colour bar."""
    font = _font(15)
    small = _font(13)
    pad, gap = 12, 14
    row_title = _vertical_text("input patch row", font, INK)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, col_title_h = _text_size(probe, "input patch column", font)
    index_w = _text_size(probe, str(max(grid)), small)[0] + 6
    index_h = _text_size(probe, "0", small)[1] + 6
    bar, bar_margin = _colour_bar(mosaic.height, vmin, vmax, colormap)

    left = pad + row_title.width + 4 + index_w
    top = pad + col_title_h + 4 + index_h
    width = left + mosaic.width + gap + bar.width + pad
    height = top + mosaic.height + pad
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    canvas.paste(mosaic, (left, top))
    canvas.paste(bar, (left + mosaic.width + gap, top - bar_margin))
    canvas.paste(row_title, (pad, top + (mosaic.height - row_title.height) // 2), row_title)
    draw = ImageDraw.Draw(canvas)
    draw.text((left + mosaic.width // 2, pad), "input patch column", font=font, fill=INK, anchor="mt")
    gh, gw = grid
    tile_h = (mosaic.height + 1) / gh
    tile_w = (mosaic.width + 1) / gw
    every = max(1, math.ceil(max(gh, gw) / 14))  # label every k-th tile so numbers never collide
    for j in range(0, gw, every):
        draw.text((left + (j + 0.5) * tile_w, top - 3), str(j + 1), font=small, fill=MUTED_INK, anchor="mb")
    for i in range(0, gh, every):
        draw.text((left - 3, top + (i + 0.5) * tile_h), str(i + 1), font=small, fill=MUTED_INK, anchor="rm")
    return canvas


# ---------------------------------------------------------------------------------------------- distance plot


def uniform_attention_distance(grid: tuple[int, int], patch_size: int) -> float:
    """Mean distance in pixels between patch centres when every query attends uniformly to every patch."""
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    centres = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64) * patch_size
    return float(np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1).mean())


class _Axes:
    """Data -> pixel mapping of the plot area (drawn at SUPERSAMPLE scale)."""

    def __init__(self, area: tuple[int, int, int, int], x_range: tuple[float, float], y_range: tuple[float, float]):
        self.area, self.x_range, self.y_range = area, x_range, y_range

    def x(self, value: float) -> float:
        left, _, right, _ = self.area
        lo, hi = self.x_range
        return left + (value - lo) / (hi - lo) * (right - left)

    def y(self, value: float) -> float:
        _, top, _, bottom = self.area
        lo, hi = self.y_range
        return bottom - (value - lo) / (hi - lo) * (bottom - top)


def _dashed_hline(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, fill, width: int, dash: int) -> None:
    x = x0
    while x < x1:
        draw.line((x, y, min(x + dash, x1), y), fill=fill, width=width)
        x += 2 * dash


UNIFORM_LABEL = "uniform attention"


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[float, float]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, anchor="lt")
    return right - left, bottom - top


def _box_hits_dot(box: tuple[float, float, float, float], dot: tuple[float, float], radius: float) -> bool:
    left, top, right, bottom = box
    nearest_x, nearest_y = min(max(dot[0], left), right), min(max(dot[1], top), bottom)
    return (nearest_x - dot[0]) ** 2 + (nearest_y - dot[1]) ** 2 < radius**2


def uniform_label_box(
    axes: _Axes,
    depth: int,
    y_line: float,
    text_size: tuple[float, float],
    dots: list[tuple[float, float]],
    radius: float,
    s: int,
) -> tuple[float, float, float, float]:
    """Where the uniform-attention line's label goes: just above (else below) the line, at the left end, between
    two layers or at the right end, the first place where it covers no dot; the left end above the line if none."""
    left, top, right, bottom = axes.area
    width, height = text_size
    pad = 2 * s
    xs = [left + 6 * s, *(axes.x(k + 0.5) - width / 2 for k in range(1, depth)), right - 6 * s - width]
    ys = [y_line - 3 * s - height, y_line + 3 * s]
    for y in ys:
        for x in xs:
            box = (x, y, x + width, y + height)
            inside = left <= x and x + width <= right and top <= y and y + height <= bottom
            padded = (x - pad, y - pad, x + width + pad, y + height + pad)
            if inside and not any(_box_hits_dot(padded, dot, radius) for dot in dots):
                return box
    return (xs[0], ys[0], xs[0] + width, ys[0] + height)


def distance_plot_png(
    distance: np.ndarray,
    patch_size: int,
    image_size: int | Sequence[int],
    *,
    size: tuple[int, int] = (720, 520),
) -> bytes:
    """The ViT paper's mean attention distance figure: x = layer, y = distance in pixels, one dot per head.

    A dashed line marks the distance of uniform attention over the model's grid (image_size // patch_size),
    so heads that look locally sit below it and heads that look globally sit near it.
    """
    distance = np.asarray(distance, dtype=np.float64)
    if distance.ndim != 2 or distance.size == 0:
        raise ValueError(f"distance must be a non-empty (depth, heads) array, got shape {distance.shape}")
    depth, heads = distance.shape
    img_h, img_w = _as_hw(image_size)
    grid = (max(1, img_h // patch_size), max(1, img_w // patch_size))
    uniform = uniform_attention_distance(grid, patch_size)

    s = SUPERSAMPLE
    width, height = size[0] * s, size[1] * s
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, title_font = _font(13 * s), _font(15 * s)

    legend_w = (90 * s) if heads <= len(HEAD_COLOURS) else 0
    area = (70 * s, 40 * s, width - 24 * s - legend_w, height - 56 * s)
    y_top_data = max(float(np.nanmax(distance)), uniform) * 1.08
    y_step = _nice_step(y_top_data)
    y_max = math.ceil(y_top_data / y_step) * y_step
    axes = _Axes(area, (0.5, depth + 0.5), (0.0, y_max))

    _draw_axes(canvas, axes, depth, y_step, font, s)
    title = f"Mean attention distance - {img_h}x{img_w} image, patch {patch_size}"
    draw.text(((area[0] + area[2]) / 2, 12 * s), title, font=title_font, fill=INK, anchor="mt")
    y_uniform = axes.y(uniform)
    _dashed_hline(draw, area[0], area[2], y_uniform, MUTED_INK, s, 6 * s)

    radius = max(3.0, min(5.0, 60.0 / depth)) * s
    spread = min(0.3, 0.06 * heads) if heads > 1 else 0.0  # heads fan out a little around their layer
    dots = []
    for layer in range(depth):
        for head in range(heads):
            value = distance[layer, head]
            if not np.isfinite(value):
                continue
            offset = (head / (heads - 1) - 0.5) * spread if heads > 1 else 0.0
            cx, cy = axes.x(layer + 1 + offset), axes.y(float(value))
            colour = HEAD_COLOURS[head % len(HEAD_COLOURS)]
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour, outline=BACKGROUND)
            dots.append((cx, cy))
    text_w, text_h = _text_size(draw, UNIFORM_LABEL, font)
    box = uniform_label_box(axes, depth, y_uniform, (text_w, text_h), dots, radius, s)
    draw.text(box[:2], UNIFORM_LABEL, font=font, fill=MUTED_INK, anchor="lt")
    if legend_w:
        _draw_legend(draw, (area[2] + 16 * s, area[1]), heads, font, s)
    return _png(canvas.resize(size, Image.Resampling.LANCZOS))


def _draw_axes(canvas: Image.Image, axes: _Axes, depth: int, y_step: float, font, s: int) -> None:
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = axes.area
    y = 0.0
    while y <= axes.y_range[1] + 1e-9:
        py = axes.y(y)
        draw.line((left, py, right, py), fill=GRID_INK, width=s)
        draw.line((left - 5 * s, py, left, py), fill=INK, width=s)
        draw.text((left - 8 * s, py), _format_tick(y, y_step), font=font, fill=INK, anchor="rm")
        y += y_step
    x_every = max(1, math.ceil(depth / 16))
    for layer in range(1, depth + 1, x_every):
        px = axes.x(layer)
        draw.line((px, bottom, px, bottom + 5 * s), fill=INK, width=s)
        draw.text((px, bottom + 8 * s), str(layer), font=font, fill=INK, anchor="mt")
    draw.line((left, top, left, bottom), fill=INK, width=s)
    draw.line((left, bottom, right, bottom), fill=INK, width=s)
    draw.text(((left + right) / 2, bottom + 30 * s), "network depth (layer)", font=font, fill=INK, anchor="mt")
    y_title = _vertical_text("mean attention distance (pixels)", font, INK)
    canvas.paste(y_title, (8 * s, int((top + bottom - y_title.height) / 2)), y_title)


def _draw_legend(draw: ImageDraw.ImageDraw, origin: tuple[float, float], heads: int, font, s: int) -> None:
    x, y = origin
    row = 18 * s
    for head in range(heads):
        cy = y + head * row + row / 2
        colour = HEAD_COLOURS[head % len(HEAD_COLOURS)]
        draw.ellipse((x, cy - 4 * s, x + 8 * s, cy + 4 * s), fill=colour)
        draw.text((x + 14 * s, cy), f"head {head + 1}", font=font, fill=INK, anchor="lm")
