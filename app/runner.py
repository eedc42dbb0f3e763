"""One runner per device: how a batch of items becomes one result per item on the model's device.

A `Batcher` (app.batching) is handed a runner and calls it on its forward thread(s):
- `prepare(items) -> Prepared`: stack the uint8 pixels (and decode the queued JPEGs, for a runner that
  `takes_jpeg`), copy them to the device, normalise them;
- `forward(prepared) -> results`: the forward of `app.engine.Model` (the plain model of `app/model/`), then one
  small CPU result per item, or the `ImageError` of an item whose JPEG turned out undecodable;
- `warmup(max_batch_size)`: every batch size once, before the first request.

`CpuRunner` (here) packs the model's linear layers for oneDNN, in place, and lets `lanes` forwards run at once,
sharing the CPU's threads. `CudaRunner` (app.cuda_runner) prepares each batch on a side stream beside the
running forward and replays CUDA graphs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.decode import ImageError
from app.tasks import (
    ATTENTION,
    FAST,
    AttentionDistance,
    AttentionMap,
    Classify,
    Embed,
    Heatmap,
    Item,
    Task,
    Tensors,
    top_k,
)

if TYPE_CHECKING:
    from app.engine import Model, Output

log = logging.getLogger("vitserve")


@dataclass
class Prepared:
    """A batch made ready for the forward: the model's input on its device (in its dtype), the item behind each
    input row, the items whose image turned out undecodable, and on CUDA the event to wait for (the input was
    made on a side stream)."""

    items: list[Item]
    inputs: torch.Tensor  # (rows, 3, H, W)
    rows: list[int]  # rows[r]: the index in `items` of input row r
    errors: dict[int, Exception] = field(default_factory=dict)  # index in `items` -> its image error
    ready: torch.cuda.Event | None = None


class Runner(Protocol):
    model: Model
    lanes: int  # forwards that may run at once, one thread each
    overlap: bool  # prepare the next batch on a thread of its own while the current one runs
    takes_jpeg: bool  # JPEGs are queued compressed and decoded with their batch on the device
    fast_path: str  # what speeds up the forward without attention weights: onednn, cudagraph or eager

    def prepare(self, items: list[Item]) -> Prepared: ...
    def forward(self, prepared: Prepared) -> list[object]: ...
    def warmup(self, max_batch_size: int) -> None: ...


def make_runner(
    model: Model,
    *,
    max_batch_size: int,
    fast: bool = True,
    jpeg_decoder: str = "auto",
    share: ThreadShare | None = None,
    lanes: int | None = None,
) -> Runner:
    """The runner for `model`'s device. fast: pack (CPU) or capture CUDA graphs (GPU); jpeg_decoder: the
    `--jpeg-decoder` choice; share and lanes: the CPU's threads, shared by every runner of the process."""
    from app import gpu_decode

    takes_jpeg = gpu_decode.use_for(jpeg_decoder, model.device, model.preprocess_config)
    if model.device.type == "cuda":
        from app.cuda_runner import CudaRunner

        return CudaRunner(model, max_batch_size=max_batch_size, graphs=fast, takes_jpeg=takes_jpeg)
    return CpuRunner(model, max_batch_size=max_batch_size, pack=fast, takes_jpeg=takes_jpeg, share=share, lanes=lanes)


# -- the CPU --------------------------------------------------------------------------------------


class CpuRunner:
    """The CPU: prepare and forward in one step on a forward thread (nothing would overlap: the forward already
    uses every core), with the model's linear layers packed for oneDNN.

    Two lanes by default where torch's thread count is per thread (OpenMP): two forwards with half the threads
    each get through more images than one with all of them, since the threads of one forward meet at a barrier
    some hundred times a forward, and whenever decoding or the HTTP side preempts one of them the others wait."""

    overlap = False

    def __init__(
        self,
        model: Model,
        *,
        max_batch_size: int,
        pack: bool = True,
        takes_jpeg: bool = False,
        share: ThreadShare | None = None,
        lanes: int | None = None,
    ):
        self.model = model
        self.takes_jpeg = takes_jpeg
        self.fast_path = "eager"
        if pack and has_onednn_linear() and not model.float8:
            # oneDNN packs a weight for a number of rows; any other number works too: pack for the largest batch
            pack_linears(model.net, rows_hint=max_batch_size * (1 + model.config.num_patches))
            self.fast_path = "onednn"
        self.share = share or ThreadShare(torch.get_num_threads())
        if lanes is None:
            lanes = 2 if self.share.threads >= 2 else 1
        self.lanes = lanes if per_thread_intra_op() else 1

    def prepare(self, items: list[Item]) -> Prepared:
        with torch.inference_mode():
            return prepare_items(self.model, items, lambda arrays: torch.from_numpy(np.stack(arrays)))

    def forward(self, prepared: Prepared) -> list[object]:
        with self.share.slot():
            return forward_items(self.model, prepared)

    def warmup(self, max_batch_size: int) -> None:
        # oneDNN builds its kernels per shape on first use
        run_warmup(self, max_batch_size)


def has_onednn_linear() -> bool:
    """Whether this torch can run linear layers through oneDNN with pre-packed weights."""
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class OneDNNLinear(nn.Module):
    """`nn.Linear` through oneDNN: the weight packed once, an optional GELU epilogue fused in (exact or tanh).

    Measured on a 2-core AVX-512 CPU (S/16, float32): eager PyTorch sends float32 linears to MKL, which runs the
    ViT's shapes 25-35% slower than oneDNN with a packed weight; fusing the MLP's GELU saves another 19% at
    batch 8 (docs/design.md, "Speed mechanisms")."""

    def __init__(self, linear: nn.Linear, rows_hint: int, gelu: str | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        # gelu: nn.GELU's `approximate`, which oneDNN's "gelu" epilogue names its algorithm ("none": erf, "tanh")
        self.attr, self.algorithm = ("gelu", gelu) if gelu is not None else ("none", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, self.in_features), self.packed_weight, self.bias, self.attr, [], self.algorithm
        )
        return y.reshape(*lead, self.out_features)


def pack_linears(net: nn.Module, rows_hint: int, fold: bool = True) -> None:
    """Pack `net` for the CPU, in place: every layer scale folded into the linear layer (or LayerNorm) ending its
    branch (`app.model.vit.fold_layer_scales`), an MLP's GELU (exact or tanh) moved into its first layer, and every
    `nn.Linear` replaced by a `OneDNNLinear`. The model stays the same module tree, so everything written once in
    `app/model/` runs packed; CLIP's QuickGELU and SwiGLU's gate stay ops of their own (oneDNN has no such
    epilogue), around packed linears. fold=False leaves the layer scales as they are (bench.cpu_variants measures
    what folding gains)."""
    from app.model.vit import fold_layer_scales

    if fold:
        fold_layer_scales(net)
    for module in list(net.modules()):
        fc1, act = getattr(module, "fc1", None), getattr(module, "act", None)
        if isinstance(fc1, nn.Linear) and isinstance(act, nn.GELU) and act.approximate in ("none", "tanh"):
            module.fc1 = OneDNNLinear(fc1, rows_hint, gelu=act.approximate)
            module.act = nn.Identity()
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, OneDNNLinear(child, rows_hint))


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
    """The forward's intra-op threads shared among the forwards running at once in this process (every lane of
    every model): one forward alone gets all of them, two at once half each."""

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


# -- every device: prepare, forward, results ---------------------------------------------------------

Upload = Callable[[list[np.ndarray]], torch.Tensor]  # uint8 (h, w, 3) arrays -> (n, h, w, 3) on the device


def prepare_items(model: Model, items: list[Item], upload: Upload) -> Prepared:
    """Stack, copy and normalise a batch (under inference mode, on the stream the caller chose).

    uint8 pixels are uploaded and normalised; JPEGs are decoded on the device (by Pillow here for any the device
    cannot decode; one Pillow cannot decode either becomes that item's `ImageError`, never the batch's);
    preprocessed float pixels are copied as they are."""
    if items[0].tensor is not None:  # the Open Inference Protocol's FP32 pixels: rare, pageable memory will do
        inputs = torch.from_numpy(np.stack([item.tensor for item in items])).to(model.device, model.dtype)
        return Prepared(items, inputs, list(range(len(items))))
    cfg = model.preprocess_config
    host = [i for i, item in enumerate(items) if item.pixels is not None]
    arrays = [items[i].pixels for i in host]
    jpegs = [i for i, item in enumerate(items) if item.jpeg is not None]
    decoded, on_device, errors = None, [], {}
    if jpegs:
        from app import gpu_decode

        encoded = [items[i].jpeg for i in jpegs]
        decoded, ok, failed = gpu_decode.decode_batch(encoded, cfg, model.device)
        on_device = [jpegs[k] for k in ok]
        for k, error in failed.items():  # the device could not decode it: Pillow decides
            try:
                arrays.append(encoded[k].decode_here(cfg).pixels)
                host.append(jpegs[k])
                log.info("a JPEG the device could not decode (%s) was decoded by Pillow", error)
            except ImageError as e:
                errors[jpegs[k]] = e
    h, w = cfg.output_size
    inputs = torch.empty((len(host) + len(on_device), 3, h, w), dtype=model.dtype, device=model.device)
    if host:
        model.normalize_into(upload(arrays).permute(0, 3, 1, 2), inputs[: len(host)])  # one fused kernel
    if on_device:
        model.normalize_into(decoded, inputs[len(host) :])
    return Prepared(items, inputs, host + on_device, errors)


FastForward = Callable[[torch.Tensor], "Output"]


def forward_items(model: Model, prepared: Prepared, fast: FastForward | None = None) -> list[object]:
    """The forward of a prepared batch -> one CPU result per item, in order (an undecodable item's `ImageError`
    in its place). `fast`: what runs a batch without attention weights instead of the model (CUDA graphs)."""
    items = prepared.items
    results: list[object] = [None] * len(items)
    for i, error in prepared.errors.items():
        results[i] = error
    if not prepared.rows:
        return results
    row_items = [items[i] for i in prepared.rows]
    attentions = any(item.task.key == ATTENTION for item in row_items)
    with torch.inference_mode():
        if fast is not None and not attentions:
            out = fast(prepared.inputs)
        else:
            out = model(prepared.inputs, attentions=attentions, layers=_layers_read(model, row_items))
        groups: dict[type, list[int]] = defaultdict(list)
        for r, item in enumerate(row_items):
            groups[type(item.task)].append(r)
        for kind, index in groups.items():
            tasks = [row_items[r].task for r in index]
            for r, result in zip(index, HANDLERS[kind](model, out, index, tasks), strict=True):
                results[prepared.rows[r]] = result
    return results


def _layers_read(model: Model, items: list[Item]) -> set[int] | None:
    """The layers whose attention maps the batch reads: one each for class-token maps (none for a MAP model, whose
    map is its probe's), all (None) for the rollout and the distances. The other layers keep the fused attention
    kernel (materialised weights cost a few percent of the forward on a CPU, about half of it on a GPU)."""
    layers: set[int] = set()
    for item in items:
        if isinstance(item.task, AttentionMap) and item.task.method == "cls":
            if model.config.pool != "map":
                layers.add(item.task.layer % model.config.depth)
        elif item.task.key == ATTENTION:
            return None
    return layers


def _probabilities(out: Output, index: list[int]) -> np.ndarray:
    if out.logits is None:
        raise ValueError("this model has no classification head")
    return out.logits[index].float().softmax(dim=-1).cpu().numpy()


def _classify(model: Model, out: Output, index: list[int], tasks: list[Classify]) -> list[object]:
    probabilities = _probabilities(out, index)
    return [top_k(p, t.top_k) for p, t in zip(probabilities, tasks, strict=True)]


def _embed(model: Model, out: Output, index: list[int], tasks: list[Embed]) -> list[np.ndarray]:
    vectors: list[np.ndarray] = [np.empty(0)] * len(tasks)
    by_pool: dict[str, list[int]] = defaultdict(list)  # pools may differ in size (CLIP: 512 projected, 768 cls)
    for j, t in enumerate(tasks):
        by_pool[t.pool].append(j)
    for pool, js in by_pool.items():
        rows = model.pooled(out, pool)[[index[j] for j in js]]
        norm = torch.tensor([tasks[j].normalize for j in js], device=rows.device)
        if norm.any():
            rows = torch.where(norm[:, None], F.normalize(rows, dim=-1), rows)
        for j, v in zip(js, rows.cpu().numpy(), strict=True):
            vectors[j] = v
    return vectors


def _attention_map(model: Model, out: Output, index: list[int], tasks: list[AttentionMap]) -> list[Heatmap]:
    maps: list[Heatmap | None] = [None] * len(tasks)
    by_kind: dict[tuple, list[int]] = defaultdict(list)
    for j, t in enumerate(tasks):
        by_kind[(t.method, t.layer, t.head) if t.method == "cls" else ("rollout", -1, None)].append(j)
    for (method, layer, head), js in by_kind.items():
        heat, named = model.attention_heatmap(out, method, layer, head, rows=[index[j] for j in js])
        grids = heat.reshape(len(js), *model.config.grid).float().cpu().numpy()
        for j, values in zip(js, grids, strict=True):
            maps[j] = Heatmap(values, named)
    return maps  # type: ignore[return-value]


def _attention_distance(
    model: Model, out: Output, index: list[int], tasks: list[AttentionDistance]
) -> list[np.ndarray]:
    return list(model.attention_distance(out, rows=index).float().cpu().numpy())


def _tensors(model: Model, out: Output, index: list[int], tasks: list[Tensors]) -> list[dict[str, np.ndarray]]:
    wanted = {name for t in tasks for name in t.outputs}
    computed: dict[str, np.ndarray] = {}
    if wanted & {"logits", "probabilities"}:
        if out.logits is None:
            raise ValueError("this model has no classification head")
        computed["logits"] = out.logits[index].float().cpu().numpy()
        computed["probabilities"] = _probabilities(out, index)
    if "embedding" in wanted:
        computed["embedding"] = out.embedding[index].float().cpu().numpy()
    rows = [j for j, t in enumerate(tasks) if "attention_rollout" in t.outputs]
    if rows:  # as /v1/attention?method=rollout: only the rows that asked for it
        heat, _ = model.attention_heatmap(out, "rollout", rows=[index[j] for j in rows])
        grids = heat.reshape(len(rows), *model.config.grid).float().cpu().numpy()
        computed["attention_rollout"] = np.zeros((len(tasks), *grids.shape[1:]), np.float32)
        computed["attention_rollout"][rows] = grids
    return [{name: computed[name][j] for name in t.outputs} for j, t in enumerate(tasks)]


HANDLERS: dict[type, Callable] = {
    Classify: _classify,
    Embed: _embed,
    AttentionMap: _attention_map,
    AttentionDistance: _attention_distance,
    Tensors: _tensors,
}


# -- warm-up ----------------------------------------------------------------------------------------


def default_buckets(max_batch_size: int) -> list[int]:
    """Powers of two up to `max_batch_size`, and `max_batch_size` itself: 8 -> [1, 2, 4, 8]."""
    if max_batch_size < 1:
        raise ValueError(f"max batch size must be at least 1, not {max_batch_size}")
    sizes = {1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size}
    return sorted(sizes | {max_batch_size})


def run_warmup(runner: Runner, max_batch_size: int) -> None:
    """Run the fast path at every batch size the batcher will use, and the attention path at the smallest and
    largest (oneDNN and cuDNN build their kernels per shape on first use)."""
    for size in default_buckets(max_batch_size):
        runner.forward(runner.prepare(warmup_items(runner, size, FAST)))
    for size in sorted({1, max_batch_size}):
        runner.forward(runner.prepare(warmup_items(runner, size, ATTENTION)))


def warmup_items(runner: Runner, batch_size: int, key: str) -> list[Item]:
    """Dummy items that exercise one path at one batch size; for a runner that takes JPEGs the first is a small
    JPEG, so that the device's decoder is set up before the first request."""
    model = runner.model
    h, w = model.preprocess_config.output_size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    task: Task
    if key == ATTENTION:
        task = AttentionMap("rollout")
    elif model.num_classes > 0:  # 0 for a projection head (CLIP), which gives no logits
        task = Classify(1)
    else:
        task = Embed()
    items = [Item(task, pixels=pixels)] * batch_size
    if key == FAST and batch_size and runner.takes_jpeg:
        items[0] = Item(task, jpeg=_warmup_jpeg())
    return items


def _warmup_jpeg():  # -> Encoded
    import io

    from PIL import Image

    from app.decode import Encoded

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 60, 200)).save(buffer, "JPEG")
    return Encoded(buffer.getvalue(), (64, 48), 1, 64 * 48)
