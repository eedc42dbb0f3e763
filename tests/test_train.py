"""The training entry and the bundled default model it wrote (models/mnist-vit).

The accuracy claims are read from the checkpoint's own metadata (`metrics`, written by `python -m app.train`
from a measurement of that file), never typed here; each is re-measured through `app.load_model` and the
model's own preprocessing. The margins allow a few borderline images to flip on another CPU, torch build
or FreeType version (font rendering), nothing more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import app
from app import digits, train
from app.checkpoints import native
from app.checkpoints.detect import list_repository

BUNDLED = train.DEFAULT_OUT / train.CHECKPOINT
MNIST_MARGIN = 0.005  # 5 of the 1,000 held-out images
RENDERED_MARGIN = 0.01

TINY = dict(
    epochs=1, teacher_epochs=1, max_steps=2, batch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
    font_copies=1, warmup_epochs=1,
)  # fmt: skip


# -- the training function -----------------------------------------------------------------------
def test_training_writes_a_loadable_native_checkpoint(tmp_path):
    recipe = train.Recipe(**TINY)
    model, summary = train.fit(recipe, log=lambda *a, **k: None)
    assert summary["steps"] == recipe.max_steps
    path = tmp_path / "tiny" / train.CHECKPOINT
    path.parent.mkdir()
    train.save(path, model, recipe, train.training_record(recipe, summary, "test"), {"mnist_test": 0.1})

    loaded = app.load_model(str(path.parent))
    assert loaded.info["format"] == "native"
    assert loaded.info["grid"] == [7, 7] and loaded.info["embed_dim"] == 32
    assert loaded.labels == digits.LABELS
    assert loaded.info["preprocess"]["grayscale"] is True and "invert" not in loaded.info["preprocess"]
    images, _ = digits.font_test_images(dark_on_light=True, fonts=(None,), render=((40, 30),))
    pixels = loaded.preprocess(images)
    with torch.no_grad():
        expected = model(pixels)  # the in-memory model and the file agree
    torch.testing.assert_close(loaded(pixels).logits, expected, atol=1e-5, rtol=1e-4)
    meta = native.read_metadata(path)
    assert meta["training"]["split_digest"] == digits.split_digest()


def test_training_is_deterministic_for_a_seed():
    quiet = lambda *a, **k: None  # noqa: E731
    first, _ = train.fit(train.Recipe(**TINY), log=quiet)
    second, _ = train.fit(train.Recipe(**TINY), log=quiet)
    other, _ = train.fit(train.Recipe(**{**TINY, "seed": 1}), log=quiet)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())


def test_split_is_fixed_stratified_and_disjoint():
    train_x, train_y, test_x, test_y = digits.mnist_split()
    assert len(test_y) == 1000 and len(train_y) == 4000
    assert np.bincount(test_y).tolist() == [100] * 10
    idx = digits.test_indices()
    assert np.array_equal(idx, digits.test_indices())
    # no held-out image is also a training image
    train_rows = {row.tobytes() for row in train_x.reshape(len(train_x), -1)}
    assert not any(row.tobytes() in train_rows for row in test_x.reshape(len(test_x), -1))


def test_test_fonts_are_not_training_fonts():
    assert not set(digits.TRAIN_FONTS) & set(digits.TEST_FONTS)


def test_augmentation_gives_both_polarities_in_range():
    g = torch.Generator().manual_seed(0)
    x, _, _, _ = digits.mnist_split()
    batch = torch.from_numpy(x[:256]).float().div(255).unsqueeze(1)
    out = train.augment(batch, g)
    assert out.shape == batch.shape and out.min() >= 0 and out.max() <= 1
    border = torch.cat([out[:, 0, 0, :], out[:, 0, -1, :]], dim=1).mean(1)  # the paper's level
    assert (border > 0.5).float().mean().item() == pytest.approx(0.5, abs=0.1)


# -- the bundled default model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled():
    if not BUNDLED.is_file():
        pytest.fail(f"the bundled checkpoint {BUNDLED} is missing; run `python -m app.train`")
    return app.load_model(str(BUNDLED.parent))


@pytest.fixture(scope="module")
def claims() -> dict:
    return native.read_metadata(BUNDLED)["metrics"]


def test_bundled_model_is_the_repository_default(bundled):
    names = [name for name, _ in list_repository(BUNDLED.parent.parent)]
    assert names[0] == BUNDLED.parent.name
    info = bundled.info
    assert info["format"] == "native" and info["num_classes"] == 10 and info["grid"] == [7, 7]
    assert bundled.labels == digits.LABELS
    assert BUNDLED.stat().st_size < 5 * 2**20
    card = (BUNDLED.parent / "README.md").read_text()
    assert f"{100 * native.read_metadata(BUNDLED)['metrics']['mnist_test']:.1f}%" in card


def test_bundled_model_meets_its_mnist_claim(bundled, claims):
    assert claims["mnist_test"] >= 0.97  # the target the model was trained for
    assert native.read_metadata(BUNDLED)["training"]["split_digest"] == digits.split_digest()
    for invert, key in ((False, "mnist_test"), (True, "mnist_test_inverted")):
        acc = train.score(bundled, *digits.mnist_test_images(invert=invert))
        assert acc >= claims[key] - MNIST_MARGIN, (key, acc, claims[key])


@pytest.mark.parametrize("dark_on_light", [True, False], ids=["dark_on_light", "light_on_dark"])
def test_bundled_model_reads_typed_digits_in_held_out_fonts(bundled, claims, dark_on_light):
    key = "fonts_dark_on_light" if dark_on_light else "fonts_light_on_dark"
    acc = train.score(bundled, *digits.font_test_images(dark_on_light=dark_on_light))
    assert acc >= claims[key] - RENDERED_MARGIN, (key, acc, claims[key])


def test_bundled_model_reads_canvas_drawings_in_both_polarities(bundled, claims):
    for polarity, (images, labels) in digits.canvas_test_images().items():
        acc = train.score(bundled, images, labels)
        assert acc >= claims[f"canvas_{polarity}"] - RENDERED_MARGIN, (polarity, acc)
