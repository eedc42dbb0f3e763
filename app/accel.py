"""Optional speed-ups for the engine's fast path (classify / embed: no attention weights).

`accelerate(net, device, dtype, batch_sizes, mode)` returns an `Accelerated` forward: pixels (B, 3, H, W) in the
model's dtype on its device -> (tokens, logits or None), the same function as
`net.forward_features(x).tokens` and `net.forward_head(tokens)`, made faster by one of these strategies:

- `eager`: the module as it is (what `mode="off"` gives; also the fallback when a speed-up cannot be built).
- `onednn` (CPU): the same modules, but every linear layer runs through oneDNN with its weight pre-packed once,
  the MLP's exact GELU fused into its first linear layer and each residual addition into the layer before it.
  No compiling: ready in well under a second. The attention path (forwards that return the weights) runs on
  these layers too (`Accelerated.attention_net`); under the other strategies it runs on the module as it is.
  Measured here (AMD EPYC, AVX-512): eager PyTorch sends float32 linears to MKL, which runs these shapes about
  25-35% slower than oneDNN on this CPU; ONNX Runtime's own GEMMs are as fast as oneDNN's (bench/cpu_variants.py).
- `compile` (CPU): `torch.compile` with inductor and freezing (weights become constants and are pre-packed).
  One graph per batch-size bucket, `dynamic=False`. Slower to start (a C++ compiler, seconds to minutes per
  bucket) and, measured here, no faster than `onednn`: with fixed shapes inductor packs float32 linears for MKL.
- `cudagraph` (CUDA): one CUDA graph per bucket, captured at warm-up over the eager module: a static input
  buffer, copy in, replay, copy the rows out. Removes the kernel-launch cost that dominates small batches.
- `compile+cudagraph` (CUDA): the same graphs captured over the inductor-compiled module (fused LayerNorm,
  GELU and residual kernels), for the highest throughput at large batches.

A batch whose size is not a bucket is padded up to the next bucket on CUDA (a GPU's cost is nearly flat in the
batch size) and split into bucket-sized chunks on the CPU (where every padded row costs its full share). Rows
of a ViT never mix (LayerNorm, attention and the MLP all act within one image), so padding rows change no
other row's result.

Nothing here runs at import: thread counts and dynamo's cache limit are only touched when asked for.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from app.model.float8 import Float8Linear

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("off", "auto", "on")
STRATEGIES: tuple[str, ...] = ("eager", "onednn", "compile", "cudagraph", "compile+cudagraph")
Result = tuple[torch.Tensor, torch.Tensor | None]


class FastPath(nn.Module):
    """The classify / embed forward as one module: pixels -> (final-normed tokens, logits or None)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> Result:
        tokens = self.net.forward_features(x).tokens
        return tokens, self.net.forward_head(tokens)


# -- choosing --------------------------------------------------------------------------------------


def has_cpp_compiler() -> bool:
    """Whether inductor's CPU backend can build its kernels here (it needs a C++ compiler)."""
    try:
        from torch._inductor import cpp_builder

        return shutil.which(cpp_builder.get_cpp_compiler()) is not None
    except Exception:  # no compiler found, or an inductor without this helper
        return any(shutil.which(c) for c in ("g++", "clang++", "c++"))


def has_onednn_linear() -> bool:
    """Whether this torch can run linear layers through oneDNN with pre-packed weights."""
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def resolve_strategy(mode: str, device: torch.device) -> str:
    """`off` / `auto` / `on` (or a strategy name, for benchmarks) -> the strategy for this device.

    auto: oneDNN linears on a CPU, CUDA graphs on a GPU (neither compiles anything at start-up).
    on: inductor as well: compile on a CPU, compile + CUDA graphs on a GPU.
    """
    if mode in STRATEGIES:
        strategy = mode
    elif mode == "off":
        strategy = "eager"
    elif mode == "auto":
        strategy = "cudagraph" if device.type == "cuda" else ("onednn" if has_onednn_linear() else "eager")
    elif mode == "on":
        strategy = "compile+cudagraph" if device.type == "cuda" else "compile"
    else:
        raise ValueError(f"unknown compile mode {mode!r}; use one of {[*MODES, *STRATEGIES]}")
    if "cudagraph" in strategy and device.type != "cuda":
        raise ValueError(f"strategy {strategy!r} needs a CUDA device, not {device}")
    if strategy == "onednn" and (device.type != "cpu" or not has_onednn_linear()):
        raise ValueError("strategy 'onednn' needs a CPU build of torch with oneDNN (mkldnn)")
    if strategy == "compile" and device.type == "cpu" and not has_cpp_compiler():
        raise ValueError("torch.compile on the CPU needs a C++ compiler (g++ or clang++); none was found")
    return strategy


def default_buckets(max_batch_size: int) -> list[int]:
    """Powers of two up to `max_batch_size`, and `max_batch_size` itself: 8 -> [1, 2, 4, 8]."""
    if max_batch_size < 1:
        raise ValueError(f"max batch size must be at least 1, not {max_batch_size}")
    sizes = {1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size}
    return sorted(sizes | {max_batch_size})


def plan_chunks(n: int, buckets: Sequence[int], pad: bool) -> list[tuple[int, int]]:
    """Cut a batch of `n` rows into runs of (rows, bucket) with rows <= bucket and every bucket in `buckets`.

    pad=True: as few runs as possible, the last one padded up to the smallest bucket that holds it.
    pad=False: no padding; greedy largest bucket that fits (buckets always include 1 when pad is False).
    """
    buckets = sorted(buckets)
    largest = buckets[-1]
    runs: list[tuple[int, int]] = []
    while n > 0:
        if n >= largest:
            runs.append((largest, largest))
            n -= largest
        elif pad:
            runs.append((n, next(b for b in buckets if b >= n)))
            n = 0
        else:
            b = max(b for b in buckets if b <= n)
            runs.append((b, b))
            n -= b
    return runs


# -- the accelerated forward -----------------------------------------------------------------------


class Accelerated:
    """A fast forward over fixed batch-size buckets; call it like `FastPath` (under inference mode).

    `warmup()` builds every bucket (compiles or captures) and records how long each took in `build_seconds`.
    Buckets not built at warm-up are built on first use. Only the eager and oneDNN strategies, which keep no
    state between calls, may be called from two threads at once (the CPU lanes, `app.tasks.forward_lanes`).
    """

    def __init__(
        self,
        fast: FastPath,
        strategy: str,
        device: torch.device,
        dtype: torch.dtype,
        buckets: Sequence[int],
        image_size: tuple[int, int],
        in_chans: int = 3,
    ):
        self.fast = fast
        self.strategy = strategy
        self.device = device
        self.dtype = dtype
        self.buckets = sorted(set(buckets)) if strategy not in ("eager", "onednn") else []
        self.input_shape = (in_chans, *image_size)
        self.pad = device.type == "cuda"
        if not self.pad and self.buckets and self.buckets[0] != 1:
            self.buckets = [1, *self.buckets]  # splitting without padding needs a bucket of 1
        self.build_seconds: dict[int, float] = {}
        self._fn: Callable[[torch.Tensor], Result] = fast
        self._graphs: dict[int, _GraphBucket] = {}
        self._pool = None
        self.warm_sizes = sorted(set(buckets))
        if strategy == "onednn":
            # oneDNN packs a weight for a number of rows; any other number works too. Pack for the largest batch.
            self.fast = FastPath(onednn_copy(fast.net, rows_hint=max(buckets) * (1 + fast.net.cfg.num_patches)))
            self._fn = self.fast
        if "compile" in strategy:
            self._fn = compile_fast_path(fast)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> Result:
        if self.strategy in ("eager", "onednn") or x.shape[0] == 0:
            return self.fast(x)
        if self.strategy == "compile" and not x.is_inference():
            # dynamo guards on the tensor's kind: the graphs were built on inference tensors (warm-up), and a
            # normal tensor would trigger a second compile at serving time. A copy costs far less than that.
            x = x.clone()
        runs = plan_chunks(x.shape[0], self.buckets, self.pad)
        if len(runs) == 1 and runs[0][0] == runs[0][1]:
            return self._run_bucket(x, runs[0][1])
        parts, start = [], 0
        for rows, bucket in runs:
            parts.append(self._run_bucket(x[start : start + rows], bucket))
            start += rows
        tokens = torch.cat([p[0] for p in parts])
        logits = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        return tokens, logits

    @property
    def attention_net(self) -> nn.Module:
        """The module for forwards that return attention weights, which the buckets do not cover: the oneDNN copy
        under `onednn`, the served module itself under every other strategy."""
        return self.fast.net

    def warmup(self) -> dict[int, float]:
        """Build every bucket, largest first (CUDA graphs then share one memory pool); seconds per bucket.

        `onednn` has no buckets: it runs each batch size once (oneDNN builds its kernels per shape on first use).
        """
        if self.strategy == "onednn":
            for b in self.warm_sizes:
                start = time.perf_counter()
                with torch.inference_mode():
                    self.fast(torch.randn(b, *self.input_shape, device=self.device).to(self.dtype))
                self.build_seconds[b] = time.perf_counter() - start
        for b in sorted(self.buckets, reverse=True):
            self._ensure(b)
        return dict(self.build_seconds)

    # -- internals -----------------------------------------------------------------------------------
    def _ensure(self, bucket: int) -> None:
        if bucket in self.build_seconds:
            return
        start = time.perf_counter()
        if "cudagraph" in self.strategy:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            self._graphs[bucket] = _GraphBucket(
                self._fn, (bucket, *self.input_shape), self.dtype, self.device, self._pool
            )
        else:
            with torch.inference_mode():  # an inference tensor, as __call__ always passes (see there)
                example = torch.randn(bucket, *self.input_shape, device=self.device).to(self.dtype)
                self._fn(example)  # compiles this shape (fixed shapes: dynamic=False)
        self.build_seconds[bucket] = time.perf_counter() - start
        log.info("accel: %s bucket %d built in %.1f s", self.strategy, bucket, self.build_seconds[bucket])

    def _run_bucket(self, x: torch.Tensor, bucket: int) -> Result:
        self._ensure(bucket)
        if "cudagraph" in self.strategy:
            return self._graphs[bucket].run(x)
        if x.shape[0] < bucket:  # only reached with pad=True outside CUDA graphs (not by default)
            padded = x.new_zeros((bucket, *x.shape[1:]))
            padded[: x.shape[0]] = x
            tokens, logits = self._fn(padded)
            n = x.shape[0]
            return tokens[:n], None if logits is None else logits[:n]
        return self._fn(x)


class _GraphBucket:
    """One CUDA graph over `fn` at a fixed input shape: copy in, replay, copy out."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], Result],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        pool: object,
    ):
        # Random (not zero) contents: warm-up runs and capture see realistic values; rows beyond a short
        # batch keep whatever the previous batch left there, which is finite and never read back.
        self.static_in = torch.randn(shape, device=device).to(dtype)
        with torch.inference_mode():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # cuBLAS handles, autotuning and (for compile) code generation happen here
                    fn(self.static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # Captured on the warm-up stream (its cuBLAS workspace exists already); "thread_local": work that other
            # threads put on the GPU meanwhile (decoding, copies) does not break this capture.
            with torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                self.static_out = fn(self.static_in)

    def run(self, x: torch.Tensor) -> Result:
        n = x.shape[0]
        self.static_in[:n].copy_(x, non_blocking=True)
        self.graph.replay()
        tokens, logits = self.static_out
        # Copies: the next replay overwrites the static outputs while the caller may still hold these.
        return tokens[:n].clone(), None if logits is None else logits[:n].clone()


class OneDNNLinear(nn.Module):
    """`nn.Linear` through oneDNN: the weight pre-packed once, an optional exact-GELU epilogue fused in."""

    def __init__(self, linear: nn.Linear, rows_hint: int, gelu: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        # "gelu" with algorithm "none" is the exact (erf) GELU, as nn.GELU() computes it
        self.attr, self.algorithm = ("gelu", "none") if gelu else ("none", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, self.in_features), self.packed_weight, self.bias, self.attr, [], self.algorithm
        )
        return y.reshape(*lead, self.out_features)

    def plus(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """self(x) + residual, the addition done in the same oneDNN call (a binary post-op)."""
        lead = x.shape[:-1]
        rows, other = x.reshape(-1, self.in_features), residual.reshape(-1, self.out_features)
        y = torch.ops.mkldnn._linear_pointwise.binary(rows, other, self.packed_weight, self.bias, "add")
        return y.reshape(*lead, self.out_features)


class OneDNNBlock(nn.Module):
    """A transformer `Block` whose two residual additions ride on the output projections (`OneDNNLinear.plus`):
    two passes over the activations, and two parallel regions, fewer per block. Returns the attention weights
    when asked, as `Block` does, so the attention path runs on these layers too."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, weights = self.attn.attend(self.norm1(x), need_weights)
        x = self.attn.proj.plus(out, x)
        return self.mlp.fc2.plus(self.mlp.fc1(self.norm2(x)), x), weights  # fc1 carries the fused GELU


def onednn_copy(net: nn.Module, rows_hint: int) -> nn.Module:
    """A copy of `net` whose linear layers run through oneDNN (GELU fused into an MLP's first layer, residual
    additions into the projections before them).

    The copy holds packed weights instead of the linear layers' own; the other parameters are copied too
    (small: norms, embeddings, the patch projection). `net` itself is left as it is.
    """
    import copy

    new = copy.deepcopy(net)
    for module in list(new.modules()):
        fc1, act = getattr(module, "fc1", None), getattr(module, "act", None)
        if isinstance(fc1, nn.Linear) and isinstance(act, nn.GELU) and act.approximate == "none":
            module.fc1 = OneDNNLinear(fc1, rows_hint, gelu=True)
            module.act = nn.Identity()
    for module in list(new.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, OneDNNLinear(child, rows_hint))
    if isinstance(getattr(new, "blocks", None), nn.ModuleList):
        new.blocks = nn.ModuleList(OneDNNBlock(block) for block in new.blocks)
    return new.eval()


def compile_fast_path(fast: FastPath) -> Callable[[torch.Tensor], Result]:
    """`torch.compile` of the fast path with inductor, fixed shapes, and (on the CPU) freezing."""
    import torch._dynamo

    # Every bucket of every model is one more entry in the cache of FastPath.forward's code: raise dynamo's
    # limit so that none silently falls back to eager (8 entries by default).
    cfg = torch._dynamo.config
    for name, floor in (("recompile_limit", 256), ("cache_size_limit", 256), ("accumulated_recompile_limit", 1024)):
        if hasattr(cfg, name):  # the names moved between torch versions
            setattr(cfg, name, max(getattr(cfg, name), floor))
    # freezing: weights become constants, folded and (on the CPU) pre-packed for oneDNN / MKL. Valid because
    # the served weights never change after loading.
    return torch.compile(fast, dynamic=False, fullgraph=True, options={"freezing": True})


def accelerate(
    net: nn.Module,
    device: torch.device | str,
    dtype: torch.dtype,
    batch_sizes: Sequence[int] | int,
    mode: str = "auto",
) -> Accelerated:
    """An accelerated fast path for `net` (already on `device` in `dtype`, in eval mode).

    batch_sizes: the buckets, or the largest batch size (its powers of two become the buckets).
    mode: `off`, `auto`, `on`, or a strategy name (`eager`, `onednn`, `compile`, `cudagraph`, `compile+cudagraph`).
    Call `.warmup()` on the result to build every bucket before serving.
    """
    device = torch.device(device)
    buckets = default_buckets(batch_sizes) if isinstance(batch_sizes, int) else sorted(set(batch_sizes))
    strategy = resolve_strategy(mode, device)
    if strategy == "onednn" and any(isinstance(m, Float8Linear) for m in net.modules()):
        strategy = "eager"  # oneDNN would only take the head: the float8 layers are not nn.Linear
    cfg = net.cfg
    return Accelerated(FastPath(net), strategy, device, dtype, buckets, tuple(cfg.image_size), cfg.in_chans)


def set_threads(intra_op: int | None = None, inter_op: int | None = None) -> None:
    """Set torch's thread pools deliberately (call once at start-up, before the first forward)."""
    if intra_op:
        torch.set_num_threads(intra_op)
    if inter_op:
        try:
            torch.set_num_interop_threads(inter_op)
        except RuntimeError:  # already started: it can only be set before the first parallel work
            log.warning("inter-op threads already started; keeping %d", torch.get_num_interop_threads())


def per_thread_intra_op() -> bool:
    """Whether `torch.set_num_threads` applies to the calling thread only: true with OpenMP (the thread count is
    an OpenMP setting of each thread), which Linux and Windows builds of torch use."""
    return "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1].splitlines()[0]


class ThreadShare:
    """The forward's intra-op threads shared among the forwards running at once (`Batcher` lanes): one forward
    alone gets all of them, two at once half each. Needs `per_thread_intra_op()`."""

    def __init__(self, threads: int):
        self.threads = max(1, threads)
        self._running = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self) -> Iterator[int]:
        """Count this forward as running, set the calling thread's share, and yield it."""
        with self._lock:
            self._running += 1
            share = max(1, self.threads // self._running)
        # torch sets up each thread once, on its first query, from the last count set by any thread: have that
        # happen before ours, not after
        torch.get_num_threads()
        torch.set_num_threads(share)
        try:
            yield share
        finally:
            with self._lock:
                self._running -= 1
