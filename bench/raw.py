"""The model alone: our engine's forward beside transformers', timm's and ONNX Runtime's, on the same weights.

    python -m bench.raw                      # the full CPU run (Ti/S/B, batches 1/8/32/64, float32 [+ bfloat16])
    python -m bench.raw --quick              # S/16 at batches 1 and 8, float32, a few repeats
    python -m bench.raw --device cuda        # batches up to 256, bfloat16 and float32, CUDA graphs

Implementations (`--impls`):
  ours        the engine's `Model.__call__` (eager PyTorch, SDPA)
  ours-accel  the same model after `app.runner.make_runner` (its linear layers packed for oneDNN on a CPU, called
              as before; on a GPU the runner's CUDA graphs, one per batch-size bucket); `--compile off`: eager
  hf          transformers' ViTForImageClassification, SDPA attention (families: `Dinov2Model`,
              `Dinov2WithRegistersModel`, `CLIPVisionModelWithProjection`)
  timm        timm's VisionTransformer
  timm-compile timm under torch.compile (GPU only by default: a compiled peer to compare with)
  onnx        our model exported with torch.onnx.export, run by ONNX Runtime (float32, CPU provider or CUDA)

Shapes: the plain ViTs ti16, s16, b16 (logits; weights made by timm), and the families (`bench.common.FAMILY_SHAPES`,
the default embedding; weights made by transformers, saved in its format and loaded by our engine from there):
  dinov2-s14       DINOv2 S/14 at 224x224 (16x16 patches, layer scale), timm `vit_small_patch14_dinov2`
  dinov2-s14-reg4  the same with 4 registers, timm `vit_small_patch14_reg4_dinov2`
  clip-b16         OpenAI CLIP B/16's image tower and projection, timm `vit_base_patch16_clip_quickgelu_224`

Each (shape, dtype, batch) times its implementations round-robin, so load changes hit all alike; the figures
are medians. Ratios are ours-accel (or ours) over each peer, from the same run. Prints a table, then JSON.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from bench import common

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.raw", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, auto")
    p.add_argument("--shapes", default=None, help="comma list of ti16, s16, b16, dinov2-s14, dinov2-s14-reg4, clip-b16")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,8,32,64; 256 added on CUDA)")
    p.add_argument("--dtypes", default=None, help="comma list (default float32 + bfloat16 where native)")
    p.add_argument("--impls", default=None, help="comma list of ours, ours-accel, hf, timm, timm-compile, onnx")
    p.add_argument(
        "--compile", default="auto", choices=("off", "auto"), help="ours-accel: auto (the runner's fast path) or off"
    )
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's, reported)")
    p.add_argument("--seconds", type=float, default=None, help="time budget per (shape, dtype, batch)")
    p.add_argument("--min-repeats", type=int, default=None)
    p.add_argument("--max-batch-images", type=int, default=None, help="skip batches above this on CPU")
    p.add_argument("--only", default=None, help="shape:batch pairs to run, e.g. s16:32 (after the grid filter)")
    p.add_argument("--quick", action="store_true", help="S/16 at batches 1 and 8, float32, short timings")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    cuda = device.type == "cuda"
    if args.quick:
        args.shapes = args.shapes or "s16"
        args.batch_sizes = args.batch_sizes or ("1,64" if cuda else "1,8")
        args.dtypes = args.dtypes or ("bfloat16" if cuda else "float32")
        args.seconds = 2.0 if args.seconds is None else args.seconds
        args.min_repeats = args.min_repeats or 3
    args.shapes = args.shapes or "ti16,s16,b16"
    args.batch_sizes = args.batch_sizes or ("1,8,32,64,256" if cuda else "1,8,32,64")
    if args.dtypes is None:
        args.dtypes = (
            "bfloat16,float32" if cuda else ("float32,bfloat16" if common.cpu_has_native_bf16() else "float32")
        )
    if args.impls is None:
        args.impls = "ours,ours-accel,hf,timm,timm-compile,onnx" if cuda else "ours,ours-accel,hf,timm,onnx"
    args.seconds = (3.0 if cuda else 8.0) if args.seconds is None else args.seconds
    args.min_repeats = args.min_repeats or (20 if cuda else 3)
    return args


# -- the implementations ------------------------------------------------------------------------------


def onnx_session(net: torch.nn.Module, folder: Path, threads: int, device: torch.device):
    """Export our float32 model (logits) with a dynamic batch axis and open an ONNX Runtime session."""
    import onnxruntime as ort

    path = folder / "model.onnx"
    example = torch.randn(2, 3, *net.cfg.image_size)
    try:
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    except Exception:  # an exporter without the TorchScript path: the dynamo exporter
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(net, (example,), str(path), input_names=["pixels"], dynamic_shapes=({0: batch},), dynamo=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        # the same waiting policy as torch's OpenMP threads in this run: idle threads sleep instead of spinning
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), opts, providers=providers)


def build_impls(
    shape: str, dtype: torch.dtype, device: torch.device, impls: list[str], args, folder: Path, batch_sizes: list[int]
) -> tuple[dict, dict]:
    """name -> callable(x) returning logits (a family shape: the default embedding), any dtype, and
    per-implementation notes (build times, errors)."""
    from app.engine import load_model

    family = shape in common.FAMILY_SHAPES
    if family:
        ckpt = common.write_family_checkpoint(shape, folder / shape)
        sd = load_model(str(ckpt)).net.state_dict()  # ours, in timm's naming: what timm loads
    else:
        sd = common.random_state_dict(shape)
        ckpt = common.write_native_checkpoint(shape, folder / shape)
    dtype_name = str(dtype).removeprefix("torch.")
    built: dict = {}
    notes: dict = {}

    def guarded(name, make):
        t0 = time.perf_counter()
        try:
            built[name] = make()
            notes[name] = {"build_s": round(time.perf_counter() - t0, 2)}
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            notes[name] = {"error": f"{type(e).__name__}: {e}"[:300]}

    def result(out):  # the engine's Output -> what the peers return
        return out.embedding if family else out.logits

    if "ours" in impls:
        model = load_model(str(ckpt), device=str(device), dtype=dtype_name)
        built["ours"] = lambda x, m=model: result(m(x))
        notes["ours"] = {}
    if "ours-accel" in impls:

        def make_accel():
            from app.runner import make_runner

            m = load_model(str(ckpt), device=str(device), dtype=dtype_name)
            runner = make_runner(m, max_batch_size=max(batch_sizes), fast=args.compile != "off")
            notes_accel["fast_path"] = runner.fast_path
            graphs = getattr(runner, "graphs", None)  # CUDA: one graph per batch-size bucket, captured here
            if graphs is not None:
                graphs.capture_all()
                notes_accel["buckets_s"] = {str(k): round(v, 2) for k, v in sorted(graphs.build_seconds.items())}
                return lambda x: result(graphs(x))
            return lambda x: result(m(x))  # the CPU: the model itself runs packed

        notes_accel: dict = {}
        guarded("ours-accel", make_accel)
        notes.setdefault("ours-accel", {}).update(notes_accel)
    if "hf" in impls:
        guarded("hf", lambda: _hf_family(shape, device, dtype) if family else _hf(shape, sd, device, dtype))
    if "timm" in impls:
        guarded("timm", lambda: _timm(shape, sd, device, dtype, compiled=False))
    if "timm-compile" in impls:
        guarded("timm-compile", lambda: _timm(shape, sd, device, dtype, compiled=True))
    if "onnx" in impls and dtype == torch.float32:

        def make_onnx():
            net = load_model(str(ckpt)).net  # float32; a model without logits exports its default embedding
            sess = onnx_session(net, folder / shape, torch.get_num_threads(), device)
            return lambda x: torch.from_numpy(sess.run(None, {"pixels": x.float().cpu().numpy()})[0])

        guarded("onnx", make_onnx)
    return built, notes


def _hf_family(shape, device, dtype):
    """transformers' own model for a family shape, the same random weights as ours (our engine loaded them from
    its files); the default embedding: `pooler_output` (DINOv2), `image_embeds` (CLIP's projection)."""
    hf = common.family_hf_model(shape).to(device=device, dtype=dtype)

    @torch.inference_mode()
    def run(x):
        out = hf(pixel_values=x)
        return out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output

    return run


def _hf(shape, sd, device, dtype):
    hf = common.hf_model(shape, sd).to(device=device, dtype=dtype)

    @torch.inference_mode()
    def run(x):
        return hf(pixel_values=x).logits

    return run


def _timm(shape, sd, device, dtype, compiled: bool):
    if shape in common.FAMILY_SHAPES:
        net = common.family_timm_model(shape, sd)
    else:
        net = common.timm_model(shape)
        net.load_state_dict(sd)
    net = net.to(device=device, dtype=dtype)
    fn = torch.compile(net) if compiled else net

    @torch.inference_mode()
    def run(x):
        return fn(x)

    return run


# -- the run -----------------------------------------------------------------------------------------------


def run_config(built: dict, batch: int, dtype: torch.dtype, device: torch.device, args) -> dict:
    """Time every implementation at one batch size (round-robin) and check they agree on the logits."""
    torch.manual_seed(batch)
    x = torch.randn(batch, 3, 224, 224, device=device).to(dtype)
    x_onnx = x.float().cpu()
    fns = {name: (lambda f=f, n=name: f(x_onnx if n == "onnx" else x)) for name, f in built.items()}
    agreement = {}
    with torch.inference_mode():
        ref = built["ours"](x).float().cpu() if "ours" in built else None
        for name, f in built.items():
            if ref is not None and name != "ours":
                out = f(x_onnx if name == "onnx" else x).float().cpu()
                agreement[name] = round((out - ref).abs().max().item(), 6)
        timings = common.time_interleaved(fns, str(device), args.min_repeats, args.seconds)
    rows = {name: t.as_dict(batch) for name, t in timings.items()}
    for name, diff in agreement.items():
        rows[name]["max_abs_diff_vs_ours"] = diff
    return rows


def ratios(rows: dict) -> dict:
    """ours-accel (else ours) throughput over each other implementation's, from the same run."""
    best = "ours-accel" if "ours-accel" in rows else "ours"
    if best not in rows:
        return {}
    mine = rows[best]["images_per_s"]
    return {f"{best}/{name}": round(mine / r["images_per_s"], 3) for name, r in rows.items() if name != best}


def main(argv: list[str] | None = None) -> dict:
    common.exit_on_sigterm()
    args = parse_args(argv)
    from app.engine import resolve_device

    device = resolve_device(args.device)
    args = defaults(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes.split(",")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    only = {tuple(s.split(":")) for s in args.only.split(",")} if args.only else None
    dtypes = args.dtypes.split(",")
    impls = args.impls.split(",")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 on a GPU: TF32, as any server would run it
        torch.backends.cudnn.allow_tf32 = True
    folder = common.temp_dir("vitserve-raw-")
    result = {"bench": "raw", "device": str(device), "env": common.environment(str(device)), "args": vars(args)}
    result["results"] = []
    for shape in shapes:
        shape_batches = [b for b in batches if (only is None or (shape, str(b)) in only or (shape, "*") in only)]
        if args.max_batch_images:
            shape_batches = [b for b in shape_batches if b <= args.max_batch_images]
        if not shape_batches:
            continue
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            built, notes = build_impls(shape, dtype, device, impls, args, folder, shape_batches)
            for batch in shape_batches:
                rows = run_config(built, batch, dtype, device, args)
                entry = {"shape": shape, "dtype": dtype_name, "batch": batch, "impls": rows, "ratios": ratios(rows)}
                result["results"].append(entry)
                print_entry(entry)
            result.setdefault("build", {})[f"{shape}/{dtype_name}"] = notes
            del built
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["env"]["loadavg_end"] = os.getloadavg()
    print(summary_table(result))
    common.write_json(result, args.out)
    return result


def print_entry(entry: dict) -> None:
    parts = [f"{k} {v['images_per_s']}/s" for k, v in entry["impls"].items()]
    print(f"# {entry['shape']} {entry['dtype']} b{entry['batch']}: " + ", ".join(parts), flush=True)


def summary_table(result: dict) -> str:
    rows = []
    for e in result["results"]:
        for name, r in e["impls"].items():
            rows.append(
                {
                    "shape": e["shape"],
                    "dtype": e["dtype"],
                    "batch": e["batch"],
                    "impl": name,
                    "img/s": r["images_per_s"],
                    "p50 ms": r["latency_ms_p50"],
                    "n": r["repeats"],
                    "diff": r.get("max_abs_diff_vs_ours", ""),
                }
            )
    cols = ["shape", "dtype", "batch", "impl", "img/s", "p50 ms", "n", "diff"]
    ratio_lines = [
        f"{e['shape']} {e['dtype']} b{e['batch']}: " + ", ".join(f"{k} {v}" for k, v in e["ratios"].items())
        for e in result["results"]
    ]
    return common.table(rows, cols) + "\n\nratios (same run):\n" + "\n".join(ratio_lines)


if __name__ == "__main__":
    main()
