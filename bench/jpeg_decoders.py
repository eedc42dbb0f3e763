"""The JPEG decoders side by side: `--jpeg-decoder pil` (Pillow in the pool) against `torchvision` (nvJPEG on a
GPU, libjpeg-turbo on the CPU), on the same real photographs and the same random ViT.

Prints JSON (and a table): per photo size, how far the device path's model-input pixels are from PIL's (max and
mean absolute difference in grey levels, against PIL with and without JPEG draft mode), how far the logits move
(max and mean absolute difference, top-1 agreement), and both paths' decode + resize throughput in images/s
(PIL on one core in this process; the device path in batches). Nothing is downloaded: the photos ship with
scikit-image and scikit-learn.

    python -m bench.jpeg_decoders --device cuda --dtype bfloat16 --out "$OUT/jpeg_decoders.json"
    python -m bench.jpeg_decoders --device cpu --shape ti16 --sizes 640x480 --seconds 1   # a quick check here
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

from bench.common import environment, sync, table, temp_dir, write_json, write_native_checkpoint


def photos() -> list[Image.Image]:
    from skimage import data

    images = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("chelsea", "astronaut", "coffee")]
    try:  # scikit-learn's photograph where it is installed (the GPU box may lack it)
        from sklearn.datasets import load_sample_image

        images.append(Image.fromarray(load_sample_image("china.jpg")))
    except ImportError:
        pass
    return images


def jpegs(size: tuple[int, int], quality: int = 90) -> list[bytes]:
    out = []
    for image in photos():
        buffer = io.BytesIO()
        image.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--shape", default="b16", help="ti16, s16 or b16 (random weights)")
    p.add_argument("--sizes", default="640x480,4000x3000", help="JPEG sizes, WxH, comma-separated")
    p.add_argument("--batch", type=int, default=64, help="images per device decode (the photos repeated)")
    p.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def measure(fn, seconds: float, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    """Calls per second of `fn` over about `seconds` (after one warm-up call)."""
    fn()
    sync(device)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 2:
        fn()
        calls += 1
    sync(device)
    return calls / (time.perf_counter() - start)


def compare(model, datas: list[bytes], args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    from app import gpu_decode
    from app.decode import decode_to_pixels, jpeg_for_device

    cfg, device, limit = model.preprocess_config, model.device, 40_000_000
    encoded = [jpeg_for_device(d, cfg, limit) for d in datas]
    out, rows, errors = gpu_decode.decode_batch(encoded, cfg, device)
    assert not errors, errors
    device_pixels = np.empty((len(datas), *out.shape[1:]), np.uint8)
    device_pixels[rows] = out.cpu().numpy()
    device_pixels = device_pixels.transpose(0, 2, 3, 1)
    result: dict = {}
    for draft in (False, True):
        pil = np.stack([decode_to_pixels(d, cfg, limit, draft=draft).pixels for d in datas])
        diff = np.abs(device_pixels.astype(np.int16) - pil.astype(np.int16))
        key = "pil_draft" if draft else "pil"
        result[f"pixels_vs_{key}_max"] = int(diff.max())
        result[f"pixels_vs_{key}_mean"] = round(float(diff.mean()), 4)
        if not draft:
            with torch.inference_mode():
                ours = model(model.normalize(torch.from_numpy(device_pixels), model.dtype)).logits
                theirs = model(model.normalize(torch.from_numpy(pil), model.dtype)).logits
            delta = (ours - theirs).abs()
            result["logits_max_abs_diff"] = round(float(delta.max()), 5)
            result["logits_mean_abs_diff"] = round(float(delta.mean()), 5)
            result["logits_scale_max_abs"] = round(float(theirs.abs().max()), 3)
            result["top1_agreement"] = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    batch = [encoded[i % len(encoded)] for i in range(args.batch)]
    result["device_images_per_s"] = round(
        args.batch * measure(lambda: gpu_decode.decode_batch(batch, cfg, device), args.seconds, device), 1
    )
    result["pil_one_core_images_per_s"] = round(
        len(datas)
        * measure(lambda: [decode_to_pixels(d, cfg, limit, draft=False) for d in datas], args.seconds, device),
        1,
    )
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import app

    folder = temp_dir("jpeg-decoders-")
    model = app.load_model(str(write_native_checkpoint(args.shape, folder)), device=args.device, dtype=args.dtype)
    rows = []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        rows.append({"size": size, **compare(model, jpegs((w, h)), args)})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    if model.device.type == "cuda":
        rows.append({"size": "peak GPU memory (MiB)", "value": torch.cuda.max_memory_allocated() // (1 << 20)})
    result = {
        "bench": "jpeg_decoders",
        "shape": args.shape,
        "dtype": str(model.dtype).removeprefix("torch."),
        "batch": args.batch,
        "environment": environment(args.device),
        "rows": rows,
    }
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
