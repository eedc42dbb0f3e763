"""JPEG batches decoded where the model runs: `torchvision.io.decode_jpeg` (nvJPEG on CUDA, libjpeg-turbo on the
CPU), then oriented, resized, cropped and rounded there exactly as `app.preprocess.to_model_pixels` does with PIL.

Used by `app.runner.prepare_items` for the queue's `Encoded` items (JPEGs whose header `app.decode` has already
checked). Nothing here is imported unless that path is in use, so torchvision stays optional at run time.

What can differ from the PIL path (`--jpeg-decoder pil`):
- the decoder: on the CPU torchvision's libjpeg-turbo gives the same pixels as Pillow's; nvJPEG uses its own
  IDCT and chroma upsampling, a grey level or two apart here and there;
- the resize: the same kernels and the same two rounded passes as Pillow, in float32 instead of fixed point, so
  an output pixel that lands on a rounding boundary can differ by one level;
- a JPEG too corrupt for nvJPEG is decoded by Pillow instead (`app.tasks`). A truncated one (no end marker),
  which nvJPEG might fill in where Pillow refuses it, never comes here: `app.decode.jpeg_for_device` leaves it
  to Pillow.

GPU memory is bounded per call: JPEGs are decoded in chunks of at most `CHUNK_PIXELS` pixels, and resized in
groups of at most `GROUP_PIXELS` (float32) pixels, whatever the batch size.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F

from app.decode import Encoded
from app.preprocess import PreprocessConfig, crop_box, resized_size

CHUNK_PIXELS = 1 << 27  # decoded at once: 134 M pixels, 400 MB of uint8 RGB
GROUP_PIXELS = 1 << 25  # resized at once: 33 M pixels, 400 MB of float32 RGB

# torch.frombuffer over the request's immutable bytes (no copy): the decoder only reads them
warnings.filterwarnings("ignore", message="The given buffer is not writable", module=r"app\.gpu_decode")


# -- app.preprocess's geometry on tensors -----------------------------------------------------------------------

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


@functools.cache
def available() -> bool:
    """Whether torchvision can be imported (checked without importing it)."""
    return importlib.util.find_spec("torchvision") is not None


def use_for(choice: str, device: torch.device | None, cfg: PreprocessConfig) -> bool:
    """Whether a model on `device` with preprocessing `cfg` gets its JPEGs decoded here, for `--jpeg-decoder`
    `choice` (auto: on CUDA when torchvision is installed). Never for a resize filter that torch does not
    reproduce (lanczos, box, hamming, nearest): those stay exact on the PIL path."""
    if choice == "pil" or cfg.interpolation not in TENSOR_INTERPOLATIONS or not available():
        return False
    return choice == "torchvision" or getattr(device, "type", "cpu") == "cuda"


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> upright, for EXIF orientation 1-8: the transposes of PIL's `exif_transpose`."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return image.flip(-1)
    if orientation == 3:  # ROTATE_180
        return image.flip(-2, -1)
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return image.flip(-2)
    if orientation == 5:  # TRANSPOSE
        return image.transpose(-2, -1)
    if orientation == 6:  # ROTATE_270 (a quarter turn clockwise)
        return torch.rot90(image, k=-1, dims=(-2, -1))
    if orientation == 7:  # TRANSVERSE
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # ROTATE_90 (a quarter turn anticlockwise)
        return torch.rot90(image, k=1, dims=(-2, -1))
    return image


def decode_batch(
    encoded: list[Encoded], cfg: PreprocessConfig, device: torch.device
) -> tuple[torch.Tensor, list[int], dict[int, Exception]]:
    """JPEGs -> (uint8 (n, 3, h, w) model-input pixels on `device`, the indices into `encoded` of its n rows,
    {index: error} for the JPEGs the device could not decode). Runs on the caller's current stream."""
    h, w = cfg.output_size
    out = torch.empty((len(encoded), 3, h, w), dtype=torch.uint8, device=device)
    rows: list[int] = []
    errors: dict[int, Exception] = {}
    for chunk in _chunks(encoded, CHUNK_PIXELS):
        by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = defaultdict(list)
        images = _decode([torch.frombuffer(encoded[i].data, dtype=torch.uint8) for i in chunk], device)
        for i, image in zip(chunk, images, strict=True):
            if isinstance(image, Exception):
                errors[i] = image
                continue
            image = orient(image, encoded[i].orientation)
            if (image.shape[-1], image.shape[-2]) != encoded[i].size:  # never trust a decoder over the header
                errors[i] = ValueError(f"decoded {tuple(image.shape)}, the header says {encoded[i].size}")
                continue
            by_shape[tuple(image.shape)].append((i, image))
        for shape, members in by_shape.items():
            per_group = max(1, GROUP_PIXELS // (shape[-1] * shape[-2]))
            for start in range(0, len(members), per_group):
                group = members[start : start + per_group]
                batch = torch.stack([image for _, image in group])  # (g, 3, H, W) uint8
                n = len(rows)
                out[n : n + len(group)] = to_model_pixels_tensor(batch, cfg)  # whole numbers 0..255: exact
                rows.extend(i for i, _ in group)
    return out[: len(rows)], rows, errors


def _chunks(encoded: list[Encoded], budget: int) -> list[list[int]]:
    """Indices in runs of at most `budget` decoded pixels (a run holds at least one image)."""
    chunks: list[list[int]] = [[]]
    pixels = 0
    for i, e in enumerate(encoded):
        n = e.size[0] * e.size[1]
        if chunks[-1] and pixels + n > budget:
            chunks.append([])
            pixels = 0
        chunks[-1].append(i)
        pixels += n
    return [c for c in chunks if c]


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """One batched decode; when it fails (it never returns part of a batch), each image alone, so that only the
    bad ones fail."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        # decode_jpeg allocates its outputs on our current stream but writes them on nvJPEG's own stream, which
        # does not wait for ours: memory freed by work still queued on our stream must not be handed to it.
        torch.cuda.current_stream(device).synchronize()
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except Exception as e:
        if len(data) == 1:
            return [e]
    results: list[torch.Tensor | Exception] = []
    for one in data:
        try:
            results.append(decode_jpeg([one], mode=ImageReadMode.RGB, device=device)[0])
        except Exception as e:
            results.append(e)
    return results
