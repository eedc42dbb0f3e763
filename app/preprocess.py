"""Per-checkpoint preprocessing: resize, centre crop, normalise.

The geometric steps run on PIL images, exactly as the reference libraries' own PIL pipelines do
(transformers' `ViTImageProcessor`, timm's eval transform, torchvision's published transforms),
and produce uint8 pixels at the model's input size. Normalisation runs on a batch tensor, on the
model's device, so that only uint8 data crosses from the decoding workers to the GPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
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


class Normalizer(torch.nn.Module):
    """uint8 (B, h, w, 3) -> (B, 3, h, w), (x / 255 - mean) / std, on whatever device it lives.

    Computed as one fused multiply-add, x * scale + shift with scale = 1 / (255 std) and shift = -mean / std,
    in float32 and written straight into the output's dtype (the model's, e.g. bfloat16): one kernel from uint8
    to the model's input instead of a conversion, three arithmetic passes and a cast.
    """

    def __init__(self, cfg: PreprocessConfig):
        super().__init__()
        mean = torch.tensor(cfg.mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, dtype=torch.float64).view(1, 3, 1, 1)
        self.register_buffer("scale", (1.0 / (255.0 * std)).float(), persistent=False)
        self.register_buffer("shift", (-mean / std).float(), persistent=False)

    def forward(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2)  # a view: the kernel reads channels-last and writes channels-first
        return self.into(x, torch.empty(x.shape, dtype=dtype, device=x.device))

    def into(self, pixels: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, h, w) (any strides) -> `out` (B, 3, h, w) of any float dtype, normalised; returns `out`."""
        return torch.addcmul(self.shift, pixels, self.scale, out=out)


# -- the same geometry on tensors (JPEGs decoded on the model's device, app.gpu_decode) ---------------------------

TENSOR_INTERPOLATIONS = ("bilinear", "bicubic")  # PIL's filters that torch reproduces (antialias=True)
# ITU-R 601-2 luma in Pillow's fixed point: L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16
_LUMA = (19595, 38470, 7471)


def resize_like_pil(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """float (N, 3, H, W) holding 0..255 -> float (N, 3, h, w) holding integers 0..255, as PIL's `resize`.

    Pillow resamples in two passes, horizontal first, each rounded and clipped to 8 bits; the kernels
    (support scaled by the reduction, bicubic a = -0.5) are the ones torch uses with antialias=True. Doing
    the same two passes with the same rounding leaves only float-versus-fixed-point differences of weights.
    """
    if interpolation not in TENSOR_INTERPOLATIONS:
        raise ValueError(f"{interpolation!r} resizing has no tensor equivalent of PIL's; use the PIL path")
    h, w = size
    if x.shape[-1] != w:
        x = F.interpolate(x, size=(x.shape[-2], w), mode=interpolation, antialias=True, align_corners=False)
        x = _round_uint8_range(x)
    if x.shape[-2] != h:
        x = F.interpolate(x, size=(h, w), mode=interpolation, antialias=True, align_corners=False)
        x = _round_uint8_range(x)
    return x


def _round_uint8_range(x: torch.Tensor) -> torch.Tensor:
    # Pillow's clip8: (sum + 0.5) truncated, clipped to 0..255 (round half up, not to even)
    return x.add_(0.5).floor_().clamp_(0.0, 255.0)


def crop_tensor(x: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """(..., H, W) -> the (left, top, right, bottom) box; outside the image is black, as PIL's `crop` pads."""
    left, top, right, bottom = box
    height, width = x.shape[-2:]
    if left >= 0 and top >= 0 and right <= width and bottom <= height:
        return x[..., top:bottom, left:right]
    out = x.new_zeros((*x.shape[:-2], bottom - top, right - left))
    src_t, src_l, src_b, src_r = max(top, 0), max(left, 0), min(bottom, height), min(right, width)
    if src_b > src_t and src_r > src_l:
        out[..., src_t - top : src_b - top, src_l - left : src_r - left] = x[..., src_t:src_b, src_l:src_r]
    return out


def to_model_pixels_tensor(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 or float (N, 3, H, W) upright RGB images of one size -> float (N, 3, h, w) of whole grey levels at
    the model's input size: the steps of `to_model_pixels` (resize, crop, grayscale, invert) on any device."""
    x = x.float()
    width, height = x.shape[-1], x.shape[-2]
    rw, rh = resized_size(width, height, cfg.resize)
    x = resize_like_pil(x, (rh, rw), cfg.interpolation)
    if cfg.crop is not None:
        x = crop_tensor(x, crop_box(rw, rh, cfg.crop, cfg.crop_rounding))
    if cfg.grayscale:
        weights = torch.tensor(_LUMA, dtype=torch.int32, device=x.device).view(1, 3, 1, 1)
        luma = ((x.to(torch.int32) * weights).sum(dim=1, keepdim=True) + 0x8000) >> 16
        x = luma.float().expand(-1, 3, -1, -1)
    if cfg.invert:
        x = 255.0 - x
    return x
