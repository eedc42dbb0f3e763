"""app/visuals.py: the colour map against matplotlib itself, and what the PNGs show, decoded and measured."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage
from skimage import data

from app import analysis, visuals
from app.preprocess import PreprocessConfig, seen_region


def decode(png: bytes) -> Image.Image:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def nearest_lut_value(rgb: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Invert the colour map: each RGB pixel -> the [0, 1] position of the closest table entry."""
    d = ((rgb[..., None, :].astype(np.int32) - lut[None, None].astype(np.int32)) ** 2).sum(-1)
    return d.argmin(-1) / (len(lut) - 1)


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    return Image.fromarray(data.chelsea())  # 451 x 300, a real photo


def peaked_heatmap(grid: tuple[int, int], peak: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A smooth random map in [0, 0.5] with one cell at 1: where the hottest spot must show."""
    rng = np.random.default_rng(seed)
    heatmap = rng.random(grid) * 0.5
    heatmap[peak] = 1.0
    return heatmap


# ---------------------------------------------------------------------------------------------- colour map


@pytest.mark.parametrize("name", ["viridis", "inferno"])
def test_colormap_table_is_matplotlibs_exactly(name):
    reference = colormaps[name]
    assert np.array_equal(visuals.colormap_table(name), np.asarray(reference.colors, dtype=np.float64))
    assert np.array_equal(visuals.colormap_lut(name), reference(np.arange(256), bytes=True)[:, :3])


def test_apply_colormap_indexes_as_matplotlib_does():
    values = np.concatenate([[0.0, 1.0, 0.5, 1 / 256, 255 / 256, 0.999999], np.random.default_rng(0).random(500)])
    expected = colormaps["viridis"](values, bytes=True)[:, :3]
    assert np.array_equal(visuals.apply_colormap(values), expected)
    # out of range and NaN are clipped instead of failing
    assert np.array_equal(visuals.apply_colormap(np.array([-3.0, 7.0])), expected[[0, 1]])
    assert np.array_equal(visuals.apply_colormap(np.array([np.nan])), expected[[0]])


def test_unknown_colormap_is_refused():
    with pytest.raises(ValueError, match="unknown colour map"):
        visuals.colormap_table("jet")


# ---------------------------------------------------------------------------------------------- overlay


def box_cell_centre(box, grid, cell) -> tuple[float, float]:
    """(x, y) in image pixels of the centre of heatmap cell `cell` mapped onto `box`."""
    left, top, right, bottom = box
    return (
        left + (cell[1] + 0.5) * (right - left) / grid[1],
        top + (cell[0] + 0.5) * (bottom - top) / grid[0],
    )


@pytest.mark.parametrize(("grid", "peak"), [((14, 14), (3, 9)), ((4, 4), (2, 1)), ((7, 5), (6, 0))])
def test_overlay_hottest_spot_is_where_the_heatmap_argmax_maps(cat, grid, peak):
    cfg = PreprocessConfig(resize=256, crop=(224, 224))  # the usual ImageNet crop: the model sees a box
    box = seen_region(cat.width, cat.height, cfg)
    heatmap = peaked_heatmap(grid, peak)
    overlay = decode(visuals.overlay_png(cat, heatmap, box, alpha=1.0))
    assert overlay.mode == "RGB" and overlay.size == cat.size

    left, top, right, bottom = visuals._pixel_box(box, cat.width, cat.height)
    inside = np.asarray(overlay)[top:bottom, left:right]
    values = nearest_lut_value(inside, visuals.colormap_lut())
    y, x = np.unravel_index(values.argmax(), values.shape)
    cell_w, cell_h = (right - left) / grid[1], (bottom - top) / grid[0]
    assert int(x // cell_w) == peak[1] and int(y // cell_h) == peak[0]
    cx, cy = box_cell_centre(box, grid, peak)
    assert values[int(cy) - top, int(cx) - left] > 0.95  # the cell's centre carries its value (smooth, not shifted)


def test_overlay_blends_and_dims_outside_the_box(cat):
    box = (100.0, 20.0, 340.0, 260.0)
    heatmap = peaked_heatmap((8, 8), (5, 2), seed=1)
    alpha = 0.5
    overlay = np.asarray(decode(visuals.overlay_png(cat, heatmap, box, alpha=alpha)), dtype=np.float32)
    original = np.asarray(cat, dtype=np.float32)

    outside = np.ones(original.shape[:2], dtype=bool)
    outside[20:260, 100:340] = False
    expected = np.rint(original * visuals.OUTSIDE_DIM)
    assert np.abs(overlay[outside] - expected[outside]).max() <= 1  # dimmed, nothing painted there
    assert overlay[outside].mean() < original[outside].mean() * 0.5

    # inside, the colour is recoverable from the blend: colour = (out - (1 - a) * image) / a
    colour = np.clip((overlay[20:260, 100:340] - (1 - alpha) * original[20:260, 100:340]) / alpha, 0, 255)
    values = nearest_lut_value(np.rint(colour).astype(np.uint8), visuals.colormap_lut())
    y, x = np.unravel_index(values.argmax(), values.shape)
    assert (int(y // 30), int(x // 30)) == (5, 2)


def test_overlay_of_a_large_image_is_capped_with_its_aspect(cat):
    big = cat.resize((4510, 3000))
    box = (0.0, 0.0, 4510.0, 3000.0)
    overlay = decode(visuals.overlay_png(big, peaked_heatmap((4, 4), (0, 3)), box, alpha=1.0))
    assert max(overlay.size) == visuals.MAX_SIDE
    assert abs(overlay.width / overlay.height - 4510 / 3000) < 0.01
    values = nearest_lut_value(np.asarray(overlay), visuals.colormap_lut())
    y, x = np.unravel_index(values.argmax(), values.shape)
    assert (int(y // (overlay.height / 4)), int(x // (overlay.width / 4))) == (0, 3)


def test_overlay_accepts_any_mode_and_rejects_bad_input(cat):
    grey = cat.convert("L")
    overlay = decode(visuals.overlay_png(grey, np.ones((2, 2)), (0, 0, grey.width, grey.height)))
    assert overlay.mode == "RGB" and overlay.size == grey.size
    with pytest.raises(ValueError, match="heatmap"):
        visuals.overlay_png(cat, np.ones(4), (0, 0, 10, 10))
    with pytest.raises(ValueError, match="alpha"):
        visuals.overlay_png(cat, np.ones((2, 2)), (0, 0, 10, 10), alpha=2.0)


# ---------------------------------------------------------------------------------------------- mosaic


def maximum_blobs(image: Image.Image) -> list[tuple[float, float, int]]:
    """(y, x, area) of each filled square painted in the colour map's top colour (the colour bar's end is no square)."""
    pixels = np.asarray(image)
    mask = (pixels == visuals.colormap_lut()[-1]).all(-1)
    labels, _ = ndimage.label(mask)
    blobs = []
    for index, (ys, xs) in enumerate(ndimage.find_objects(labels), start=1):
        h, w = ys.stop - ys.start, xs.stop - xs.start
        area = int((labels[ys, xs] == index).sum())
        if h == w and area == h * w:
            blobs.append(((ys.start + ys.stop - 1) / 2, (xs.start + xs.stop - 1) / 2, area))
    return blobs


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (14, 14)])
def test_mosaic_follows_the_grid(grid):
    gh, gw = grid
    # similarity that peaks only on the diagonal: in tile (i, j) exactly one cell, (i, j), is at the maximum
    rng = np.random.default_rng(0)
    similarity = rng.uniform(-0.3, 0.8, size=(gh * gw, gh * gw))
    np.fill_diagonal(similarity, 1.0)
    mosaic = decode(visuals.similarity_mosaic_png(similarity, grid))
    assert mosaic.mode == "RGB"

    blobs = maximum_blobs(mosaic)
    assert len(blobs) == gh * gw
    areas = {b[2] for b in blobs}
    assert len(areas) == 1  # every self-similarity cell is one square of the same size
    cell = round(areas.pop() ** 0.5)
    assert cell * max(gh, gw) >= 24  # tiles are scaled up enough to read
    assert len({b[0] for b in blobs}) == gh and len({b[1] for b in blobs}) == gw
    # tiles are laid out row by row: the maximum of tile (i, j) sits at cell (i, j) of that tile
    ys, xs = sorted({b[0] for b in blobs}), sorted({b[1] for b in blobs})
    steps_y, steps_x = set(np.diff(ys).round(3)), set(np.diff(xs).round(3))
    assert len(steps_y) <= 1 and len(steps_x) <= 1  # evenly spaced: tile + separator + one cell
    if steps_x:
        assert steps_x.pop() > gw * cell  # wider than a tile: there is a separator between tiles


def test_mosaic_carries_a_colour_bar_from_min_to_max():
    sim = analysis.position_similarity(torch.randn(1, 1 + 6 * 6, 32)).numpy()
    mosaic = np.asarray(decode(visuals.similarity_mosaic_png(sim, (6, 6))))
    lut = visuals.colormap_lut()
    # some column runs through the whole table, top = max colour, bottom = min colour
    columns = [mosaic[:, x] for x in range(mosaic.shape[1])]
    bars = [c for c in columns if (c == lut[-1]).all(-1).any() and (c == lut[0]).all(-1).any()]
    assert bars, "no column holds both ends of the colour map"
    column = bars[-1]
    top = np.flatnonzero((column == lut[-1]).all(-1)).min()
    bottom = np.flatnonzero((column == lut[0]).all(-1)).max()
    assert bottom - top > 200  # a bar, not two stray pixels


def test_mosaic_rejects_a_mismatched_grid():
    with pytest.raises(ValueError, match="similarity"):
        visuals.similarity_mosaic_png(np.eye(16), (3, 3))


# ---------------------------------------------------------------------------------------------- distance plot


def colour_blobs(image: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> list[tuple[float, float]]:
    mask = (np.abs(image.astype(np.int32) - np.array(colour)) <= tol).all(-1)
    labels, count = ndimage.label(mask)
    return [tuple(c) for c in ndimage.center_of_mass(mask, labels, range(1, count + 1))]


def test_distance_plot_puts_one_dot_per_head_and_layer_where_the_numbers_say():
    depth, heads = 4, 3
    distance = np.zeros((depth, heads))
    distance[:, 0] = [5, 20, 40, 60]  # head 1 looks further with depth
    distance[:, 1] = 50  # head 2 always far
    distance[:, 2] = 2  # head 3 always local
    plot = decode(visuals.distance_plot_png(distance, patch_size=8, image_size=64))
    assert plot.mode == "RGB" and plot.size == (720, 520)
    pixels = np.asarray(plot)

    dots = {h: colour_blobs(pixels, visuals.HEAD_COLOURS[h]) for h in range(heads)}
    for h in range(heads):
        assert len(dots[h]) == depth + 1, f"head {h}: {len(dots[h])} marks"  # one per layer + the legend's
        dots[h] = sorted(dots[h], key=lambda c: c[1])[:depth]  # the legend sits right of the plot
    # x grows with the layer, y (pixel rows, downwards) falls as the distance rises
    head1_y = [y for y, _ in dots[0]]
    assert head1_y == sorted(head1_y, reverse=True)
    for layer in range(depth):
        assert dots[1][layer][0] < dots[2][layer][0]  # far head above local head
    # equal distances, equal heights: the y axis is linear
    assert np.ptp([y for y, _ in dots[1]]) < 1.5


def test_distance_plot_handles_one_layer_many_heads_and_rectangles():
    plot = decode(visuals.distance_plot_png(np.random.default_rng(0).random((1, 20)) * 30, 16, (224, 160)))
    assert plot.mode == "RGB" and plot.size == (720, 520)
    with pytest.raises(ValueError, match="distance"):
        visuals.distance_plot_png(np.ones(3), 16, 224)


def test_uniform_attention_distance_matches_analysis_on_uniform_weights():
    grid, patch = (5, 3), 8
    n = grid[0] * grid[1]
    uniform = torch.full((1, 2, n + 1, n + 1), 1.0 / (n + 1))
    from_analysis = analysis.attention_distance([uniform], grid, patch)
    assert torch.allclose(from_analysis, torch.tensor(visuals.uniform_attention_distance(grid, patch)).float())


def test_the_uniform_attention_label_covers_no_dot(monkeypatch):
    """Heads at the uniform distance in the early layers (the bundled model's digits do this) would sit on a
    label drawn at the line's left end: the label moves to where no dot is."""
    uniform = visuals.uniform_attention_distance((7, 7), 4)
    distance = np.array(
        [[uniform, uniform - 0.8, uniform + 0.4, 12.6], [13.8, 11.7, 12.1, 8.0], [12.6, 11.4, 13.2, 12.0]]
    )
    seen = {}
    real = visuals.uniform_label_box

    def spy(axes, depth, y_line, text_size, dots, radius, s):
        seen.update(axes=axes, text_size=text_size, dots=dots, radius=radius, s=s, y_line=y_line)
        seen["box"] = real(axes, depth, y_line, text_size, dots, radius, s)
        return seen["box"]

    monkeypatch.setattr(visuals, "uniform_label_box", spy)
    decode(visuals.distance_plot_png(distance, patch_size=4, image_size=28))
    width, height = seen["text_size"]
    s, left = seen["s"], seen["axes"].area[0]
    left_end = (left + 6 * s, seen["y_line"] - 3 * s - height, left + 6 * s + width, seen["y_line"] - 3 * s)
    assert any(visuals._box_hits_dot(left_end, d, seen["radius"]) for d in seen["dots"])  # the old spot is taken
    assert len(seen["dots"]) == distance.size
    assert not any(visuals._box_hits_dot(seen["box"], d, seen["radius"]) for d in seen["dots"])
