"""Per-checkpoint preprocessing: what each checkpoint expects, and the resize and centre crop on PIL images.

The geometric steps run on PIL images, exactly as the reference libraries' own PIL pipelines do
(transformers' `ViTImageProcessor`, timm's eval transform, torchvision's published transforms),
and produce uint8 pixels at the model's input size. Normalisation runs on a batch tensor, on the
model's device, so that only uint8 data crosses from the decoding workers to the GPU
(`app.engine.Normalizer`); the same geometry on tensors, for JPEGs decoded on the device, is in
`app.gpu_decode`.

Nothing here imports torch: the processes that decode and parse request bodies (`app.decode`) import this
module and stay free of torch's few hundred megabytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
CROP_ROUNDING = ("round", "floor")


@dataclass(frozen=True)
class PreprocessConfig:
    """What a checkpoint expects. `resize` is an int (shortest edge) or [h, w] (exact size).

    `crop_pct` (timm's crop ratio) is kept when a checkpoint declares it, so that serving at another size
    resizes to floor(size / crop_pct) exactly as timm does. `crop_rounding` says how an odd centre-crop
    margin is split: "round" (torchvision and timm: round half to even) or "floor" (transformers).
    """

    resize: int | tuple[int, int]
    crop: tuple[int, int] | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = HALF
    std: tuple[float, float, float] = HALF
    grayscale: bool = False  # read the image as grey levels (replicated to three channels)
    invert: bool = False  # 255 - x, for models trained on light-on-dark images
    crop_pct: float | None = None
    crop_rounding: str = "round"

    def __post_init__(self) -> None:
        if self.interpolation not in RESAMPLE:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; use one of {sorted(RESAMPLE)}")
        if self.crop_rounding not in CROP_ROUNDING:
            raise ValueError(f"unknown crop_rounding {self.crop_rounding!r}; use one of {CROP_ROUNDING}")

    @property
    def output_size(self) -> tuple[int, int]:
        """(h, w) of the pixels this produces."""
        if self.crop is not None:
            return tuple(self.crop)
        if isinstance(self.resize, int):
            raise ValueError("a shortest-edge resize without a crop has no fixed output size")
        return tuple(self.resize)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resize"] = self.resize if isinstance(self.resize, int) else list(self.resize)
        d["crop"] = list(self.crop) if self.crop is not None else None
        d["mean"], d["std"] = list(self.mean), list(self.std)
        # optional steps appear only when a checkpoint declares them
        for step, default in (("grayscale", False), ("invert", False), ("crop_pct", None), ("crop_rounding", "round")):
            if d[step] == default:
                del d[step]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        resize = d["resize"] if isinstance(d["resize"], int) else tuple(d["resize"])
        crop = tuple(d["crop"]) if d.get("crop") else None
        return cls(
            resize=resize,
            crop=crop,
            interpolation=d.get("interpolation", "bilinear"),
            mean=tuple(d.get("mean", HALF)),
            std=tuple(d.get("std", HALF)),
            grayscale=bool(d.get("grayscale", False)),
            invert=bool(d.get("invert", False)),
            crop_pct=float(d["crop_pct"]) if d.get("crop_pct") is not None else None,
            crop_rounding=d.get("crop_rounding", "round"),
        )


def preprocess_for_size(cfg: PreprocessConfig, size: tuple[int, int]) -> PreprocessConfig:
    """The checkpoint's preprocessing retargeted to another input size (for --image-size)."""
    d = cfg.to_dict()
    if cfg.crop is None and isinstance(cfg.resize, int):
        d["crop"] = list(size)  # a shortest-edge resize alone has no fixed size: centre-crop to the model's
        return PreprocessConfig.from_dict(d)
    if cfg.output_size == tuple(size):
        return cfg
    if cfg.crop is None:
        d["resize"] = list(size)
    elif cfg.crop_pct is not None:
        # timm's eval transform at another input size: resize to floor(size / crop_pct), crop size
        d["crop"] = list(size)
        scale = [math.floor(s / cfg.crop_pct) for s in size]
        d["resize"] = scale[0] if isinstance(cfg.resize, int) else scale
    else:
        # keep the crop ratio: resize = floor(new crop * resize / crop)
        d["crop"] = list(size)
        if isinstance(cfg.resize, int):
            d["resize"] = math.floor(size[0] * cfg.resize / cfg.crop[0] + 1e-9)
        else:
            d["resize"] = [math.floor(size[i] * cfg.resize[i] / cfg.crop[i] + 1e-9) for i in (0, 1)]
    return PreprocessConfig.from_dict(d)


def resized_size(width: int, height: int, resize: int | tuple[int, int]) -> tuple[int, int]:
    """(w, h) after resizing, with torchvision's rule for a shortest-edge size (long side truncated)."""
    if not isinstance(resize, int):
        return resize[1], resize[0]
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def crop_box(
    width: int, height: int, crop: tuple[int, int] | None, rounding: str = "round"
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre crop.

    "round" rounds the margin as torchvision's `center_crop` does (Python's round, half to even);
    "floor" floors it as transformers' `center_crop` does. They differ only for odd margins.
    """
    if crop is None:
        return (0, 0, width, height)
    ch, cw = crop
    if rounding == "floor":
        top, left = (height - ch) // 2, (width - cw) // 2
    else:
        top, left = round((height - ch) / 2.0), round((width - cw) / 2.0)
    return (left, top, left + cw, top + ch)


def seen_region(width: int, height: int, cfg: PreprocessConfig) -> tuple[float, float, float, float]:
    """The box of the original image (left, top, right, bottom) that the model sees after resize + crop."""
    rw, rh = resized_size(width, height, cfg.resize)
    left, top, right, bottom = crop_box(rw, rh, cfg.crop, cfg.crop_rounding)
    sx, sy = width / rw, height / rh
    return (left * sx, top * sy, right * sx, bottom * sy)


def to_model_pixels(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """An RGB PIL image -> uint8 (h, w, 3) at the model's input size: resize, crop, optional steps."""
    size = resized_size(image.width, image.height, cfg.resize)
    if size != image.size:
        image = image.resize(size, RESAMPLE[cfg.interpolation])
    if cfg.crop is not None:
        image = image.crop(crop_box(image.width, image.height, cfg.crop, cfg.crop_rounding))
    if cfg.grayscale:
        image = image.convert("L").convert("RGB")
    pixels = np.asarray(image, dtype=np.uint8)
    if cfg.invert:
        pixels = 255 - pixels
    return pixels
