"""Which CPU forward is fastest for our ViT: the serving path (`app.runner`'s packed linears) beside the alternatives.

    OMP_WAIT_POLICY=PASSIVE python -m bench.cpu_variants --shape s16 --batch-sizes 1,8
    python -m bench.cpu_variants --shape dinov2-s14 --variants eager,onednn,onednn-ls-apart   # what folding gains
    python -m bench.cpu_variants --variants eager,onednn,freeze-static,onnx --seconds 20

Variants (all float32 unless --dtype, same weights, round-robin timing, logits checked against eager):
  eager            our model, SDPA attention (the server with --compile off)
  onednn           what the CPU runner serves (--compile auto): a copy of the model with its linear layers packed
                   for oneDNN by `app.runner.pack_linears` (weights pre-packed, the MLP's GELU fused into fc1)
  onednn-gelu-apart the same packed linears with the GELU left a separate op: what fusing it gains
  onednn-ls-apart  packed as `onednn`, the layer scales left ops of their own: what folding them gains (a family
                   shape with layer scale: dinov2-s14, dinov2-s14-reg4)
  eager-manual     our model's attention-weights path (softmax(QK^T) materialised), as the attention endpoints run
  freeze-static    torch.compile, inductor, freezing, dynamic=False: one graph per batch size
  freeze-dynamic   the same with a dynamic batch dimension: one graph for every batch size
  nofreeze-static  torch.compile without freezing (weights stay parameters: no pre-packing, no constant folding)
  autotune         freezing + mode="max-autotune-no-cudagraphs" (inductor's C++ GEMM templates; slow to compile)
  jit-freeze       torch.jit.trace + torch.jit.freeze + optimize_for_inference (TorchScript, oneDNN fusions)
  onnx             ONNX Runtime on an export of our model (graph optimisations on)
  hf               transformers' ViTForImageClassification (SDPA), the reference point
The torch.compile variants are alternatives the server does not use (inductor lost to the packed linears on
the CPU); they stay here to re-measure that. Build seconds per variant and batch size are reported: the server
pays its own at start-up.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from torch import nn

from bench import common

ALL = "eager,onednn,onednn-gelu-apart,eager-manual,freeze-static,freeze-dynamic,nofreeze-static,jit-freeze,onnx,hf"


class FastPath(nn.Module):
    """The classify forward as one module: pixels -> (final-normed tokens, logits), what the variants compile; a
    model without logits (a family shape such as dinov2-s14) gives its default embedding in their place."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.net.forward_features(x).tokens
        return tokens, head_or_embedding(self.net, tokens)


def head_or_embedding(net: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = net.forward_head(tokens)
    return net.embed(tokens) if logits is None else logits


def build(variant: str, net, sd: dict, shape: str, batch: int, dtype: torch.dtype, folder):
    """(callable(x) -> logits, build seconds) for one variant at one batch size."""
    fast = FastPath(net)
    with torch.inference_mode():  # an inference tensor, as every variant is timed on (compile guards on the kind)
        x = torch.randn(batch, 3, 224, 224).to(dtype)
    t0 = time.perf_counter()
    if variant == "eager":
        fn = lambda x: fast(x)[1]  # noqa: E731
    elif variant in ("onednn", "onednn-gelu-apart", "onednn-ls-apart"):
        from app.runner import OneDNNLinear, has_onednn_linear, pack_linears

        if not has_onednn_linear():
            raise RuntimeError("this torch has no oneDNN linear with pre-packed weights")
        packed = copy.deepcopy(net)  # packing replaces the layers in place: the other variants keep the plain net
        rows_hint = batch * (1 + packed.cfg.num_patches)
        if variant in ("onednn", "onednn-ls-apart"):
            pack_linears(packed, rows_hint, fold=variant == "onednn")
        else:  # every nn.Linear packed as pack_linears does, no epilogue
            for module in list(packed.modules()):
                for name, child in list(module.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(module, name, OneDNNLinear(child, rows_hint))
        packed_fast = FastPath(packed)
        with torch.inference_mode():
            packed_fast(x)  # oneDNN builds its kernels per shape on first use
        fn = lambda x: packed_fast(x)[1]  # noqa: E731
    elif variant == "eager-manual":
        fn = lambda x: head_or_embedding(net, net.forward_features(x, attentions=True).tokens)  # noqa: E731
    elif variant in ("freeze-static", "freeze-dynamic", "nofreeze-static", "autotune"):
        import torch._dynamo as dynamo

        dynamo.reset()  # each variant compiles from scratch (no cache entries shared between variants)
        options = {} if variant == "nofreeze-static" else {"freezing": True}
        kwargs = {"mode": "max-autotune-no-cudagraphs"} if variant == "autotune" else {}
        compiled = torch.compile(
            fast, dynamic=False if variant != "freeze-dynamic" else None, options=options, **kwargs
        )
        if variant == "freeze-dynamic":
            dynamo.mark_dynamic(x, 0)
        with torch.inference_mode():
            compiled(x)
        fn = lambda x: compiled(x)[1]  # noqa: E731
    elif variant == "jit-freeze":
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(net, torch.randn(x.shape, dtype=x.dtype), check_trace=False)  # logits
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            frozen(x)
            frozen(x)

        def fn(x, f=frozen):
            with torch.inference_mode(False), torch.no_grad():  # TorchScript outside inference mode
                return f(x)
    elif variant == "onnx":
        from bench.raw import onnx_session

        sess = onnx_session(net.float(), folder, torch.get_num_threads(), torch.device("cpu"))
        fn = lambda x: torch.from_numpy(sess.run(None, {"pixels": x.float().numpy()})[0])  # noqa: E731
    elif variant == "hf" and shape in common.FAMILY_SHAPES:
        from bench.raw import _hf_family

        fn = _hf_family(shape, torch.device("cpu"), dtype)
    elif variant == "hf":
        hf = common.hf_model(shape, sd).to(dtype)
        fn = lambda x: hf(pixel_values=x).logits  # noqa: E731
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    return fn, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    common.exit_on_sigterm()
    p = argparse.ArgumentParser(prog="python -m bench.cpu_variants", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="s16")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--variants", default=ALL)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--min-repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from app.model import VisionTransformer

    dtype = getattr(torch, args.dtype)
    folder = common.temp_dir("vitserve-variants-")
    if args.shape in common.FAMILY_SHAPES:  # transformers' random weights, loaded by our engine from its files
        from app.engine import load_model

        net = load_model(str(common.write_family_checkpoint(args.shape, folder / args.shape))).net
        sd = net.state_dict()
    else:
        sd = common.random_state_dict(args.shape)
        net = VisionTransformer(common.vit_config(args.shape)).eval()
        net.load_state_dict(sd)
    net = net.to(dtype)
    result = {"bench": "cpu_variants", "env": common.environment("cpu"), "args": vars(args), "results": []}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        fns, builds = {}, {}
        for v in args.variants.split(","):
            try:
                fns[v], builds[v] = build(v, net, sd, args.shape, batch, dtype, folder)
            except Exception as e:  # a variant that cannot run here is reported, not fatal
                builds[v] = f"{type(e).__name__}: {e}"[:300]
        with torch.inference_mode():
            x = torch.randn(batch, 3, 224, 224).to(dtype)
            ref = fns["eager"](x).float() if "eager" in fns else None
            diffs = {v: round((f(x).float() - ref).abs().max().item(), 6) for v, f in fns.items() if ref is not None}
            timings = common.time_interleaved(
                {v: (lambda f=f, x=x: f(x)) for v, f in fns.items()}, "cpu", args.min_repeats, args.seconds
            )
        rows = {}
        for v in builds:
            row = {"build_s": round(builds[v], 1) if isinstance(builds[v], float) else builds[v]}
            if v in timings:
                row.update(timings[v].as_dict(batch))
                row["max_abs_diff_vs_eager"] = diffs.get(v)
            rows[v] = row
        base = rows.get("eager", {}).get("images_per_s")
        for row in rows.values():
            if base and "images_per_s" in row:
                row["vs_eager"] = round(row["images_per_s"] / base, 3)
        result["results"].append({"batch": batch, "loadavg": os.getloadavg()[0], "variants": rows})
        print(f"# batch {batch} (load {os.getloadavg()[0]:.1f})")
        table = [{"variant": v, **r} for v, r in rows.items()]
        cols = ["variant", "images_per_s", "latency_ms_p50", "vs_eager", "build_s", "repeats", "max_abs_diff_vs_eager"]
        print(common.table(table, cols), flush=True)
    result["env"]["loadavg_end"] = os.getloadavg()
    common.write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
