"""What a forward is for: the per-image tasks of the /v1 and /v2 endpoints, computed for a whole batch on the device.

`batch_steps(model)` gives a `Batcher` what to run on its forward thread(s): on the CPU `run_batch(model,
items)`, which stacks the uint8 pixels, normalises them, runs the fast path (no attention maps) or the
attention path, and returns one small CPU result per item (top-k predictions, an embedding, a heatmap,
distances); on CUDA the same in two steps, `prepare_batch` (on a side stream, beside the running forward)
and `forward_batch`.

Items normally carry uint8 pixels that are normalised here; the Open Inference Protocol's FP32 input
brings float32 (3, H, W) pixels that are already preprocessed. Such items travel under their own batch
key (`batch_key`), so one forward never mixes the two.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from app import analysis
from app.decode import Encoded, ImageError
from app.transfer import stack_host

if TYPE_CHECKING:
    from app.engine import Model

log = logging.getLogger("vitserve")

FAST = "fast"
ATTENTION = "attention"


@dataclass(frozen=True)
class Classify:
    top_k: int
    key = FAST


@dataclass(frozen=True)
class Embed:
    pool: Literal["default", "cls", "mean"] = "default"
    normalize: bool = False
    key = FAST


@dataclass(frozen=True)
class AttentionMap:
    method: Literal["rollout", "cls"] = "rollout"
    layer: int = -1
    head: int | None = None  # None: the mean over heads
    key = ATTENTION


@dataclass(frozen=True)
class AttentionDistance:
    key = ATTENTION


@dataclass(frozen=True)
class Tensors:
    """The Open Inference Protocol's outputs: each item gets {name: float32 array} for the names asked."""

    outputs: tuple[str, ...]

    @property
    def key(self) -> str:
        return ATTENTION if "attention_rollout" in self.outputs else FAST


Task = Classify | Embed | AttentionMap | AttentionDistance | Tensors
PREPROCESSED = "preprocessed"


@dataclass(frozen=True)
class Item:
    # uint8 (h, w, 3) at the model's input size, float32 (3, H, W) already preprocessed, or a checked JPEG that
    # the batch decodes on the model's device (app.gpu_decode)
    pixels: np.ndarray | Encoded
    task: Task


def _preprocessed(item: Item) -> bool:
    return isinstance(item.pixels, np.ndarray) and item.pixels.dtype != np.uint8


def batch_key(item: Item) -> Hashable:
    """The batcher key: the task's path, kept apart for already-preprocessed float pixels (uint8 pixels and
    JPEGs share batches)."""
    return (item.task.key, PREPROCESSED) if _preprocessed(item) else item.task.key


@dataclass
class Prepared:
    """A batch made ready for the forward: the model's input on its device (in its dtype), the item behind each
    input row, the items that turned out undecodable, and on CUDA the event to wait for (the input was made on a
    side stream)."""

    items: list[Item]
    inputs: torch.Tensor  # (rows, 3, H, W)
    rows: list[int]  # rows[r]: the index in `items` of input row r
    errors: dict[int, Exception] = field(default_factory=dict)  # index in `items` -> its image error
    ready: torch.cuda.Event | None = None


class _DeviceState:
    """Per model, on CUDA: the side stream that batches are prepared on, the pinned staging buffers, and a lock
    that keeps one batch at a time on them (the prepare thread, and a failed batch's retry on the forward thread;
    nvJPEG's outputs rely on the stream being idle when it allocates them, `gpu_decode._decode`)."""

    def __init__(self, device: torch.device):
        from app.transfer import PinnedStager

        # a high-priority stream comes from a pool of its own: never the stream a CUDA graph is captured on
        # (`torch.cuda.Stream()` hands out the default-priority pool's streams in turn), and the short copies
        # and normalisations get ahead of the forward's kernels
        self.stream = torch.cuda.Stream(device, priority=-1)
        self.stager = PinnedStager(device)
        self.lock = threading.Lock()


def _on_cuda(model: Model) -> bool:
    return model.device.type == "cuda"


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _device_state(model: Model) -> _DeviceState:
    with _STATES_LOCK:
        state = _STATES.get(model)
        if state is None:
            state = _STATES[model] = _DeviceState(model.device)
        return state


def prepare_batch(model: Model, items: list[Item]) -> Prepared:
    """Decode, stack, copy and normalise a batch (`Batcher`'s prepare step; it may run on another thread than
    the forward). On CUDA all of it is enqueued on a side stream, from pinned memory, without blocking the host.

    uint8 pixels are copied and normalised; JPEGs (`Encoded`) are decoded on the device (Pillow here for any
    the device cannot decode; an image Pillow cannot decode either becomes that item's `ImageError`, never the
    batch's); float pixels (already preprocessed) are copied as they are.
    """
    kinds = {_preprocessed(item) for item in items}
    if len(kinds) != 1:
        raise ValueError("one batch mixes uint8 and preprocessed float pixels; batch them apart (batch_key)")
    if not _on_cuda(model):
        with torch.inference_mode():
            return _prepare(model, items, preprocessed=kinds == {True}, state=None)
    state = _device_state(model)
    with state.lock, torch.inference_mode(), torch.cuda.stream(state.stream):
        prepared = _prepare(model, items, preprocessed=kinds == {True}, state=state)
        prepared.ready = torch.cuda.Event()
        prepared.ready.record(state.stream)
    return prepared


def _prepare(model: Model, items: list[Item], preprocessed: bool, state: _DeviceState | None) -> Prepared:
    if preprocessed:  # the Open Inference Protocol's FP32 pixels: rare, pageable memory is good enough
        inputs = stack_host([item.pixels for item in items]).to(model.device, model.dtype)  # type: ignore[misc]
        return Prepared(items, inputs, list(range(len(items))))
    return _prepare_uint8(model, items, state)


def _prepare_uint8(model: Model, items: list[Item], state: _DeviceState | None) -> Prepared:
    cfg = model.preprocess_config
    host = [i for i, item in enumerate(items) if isinstance(item.pixels, np.ndarray)]
    arrays: list[np.ndarray] = [items[i].pixels for i in host]  # type: ignore[misc]
    jpegs = [i for i, item in enumerate(items) if isinstance(item.pixels, Encoded)]
    decoded, on_device, errors = None, [], {}
    if jpegs:
        from app import gpu_decode

        encoded: list[Encoded] = [items[i].pixels for i in jpegs]  # type: ignore[misc]
        decoded, ok, failed = gpu_decode.decode_batch(encoded, cfg, model.device)
        on_device = [jpegs[k] for k in ok]
        for k, error in failed.items():  # the device could not decode it: Pillow decides
            i = jpegs[k]
            try:
                arrays.append(encoded[k].decode_here(cfg).pixels)
                host.append(i)
                log.info("a JPEG the device could not decode (%s) was decoded by Pillow", error)
            except ImageError as e:
                e.item = items[i]  # lets the caller name the image
                errors[i] = e
    h, w = cfg.output_size
    inputs = torch.empty((len(host) + len(on_device), 3, h, w), dtype=model.dtype, device=model.device)
    if host:
        pixels = state.stager.upload(arrays, state.stream) if state else stack_host(arrays)  # (n, h, w, 3)
        model.normalize_into(pixels.permute(0, 3, 1, 2), inputs[: len(host)])  # one fused kernel
    if on_device:
        model.normalize_into(decoded, inputs[len(host) :])
    return Prepared(items, inputs, host + on_device, errors)


def _await_prepared(model: Model, prepared: Prepared) -> None:
    """Make the current stream wait for the side stream's work on `prepared`, and tell the caching allocator that
    the current stream uses its memory (so it is not handed out again before the forward has read it)."""
    if prepared.ready is None:
        return
    current = torch.cuda.current_stream(model.device)
    current.wait_event(prepared.ready)
    prepared.inputs.record_stream(current)


@dataclass(frozen=True)
class Predictions:
    indices: np.ndarray  # int64 (k,)
    scores: np.ndarray  # float32 (k,), softmax probabilities, highest first


def forward_lanes(model: Model, threads: int, requested: int | None = None) -> int:
    """How many forwards of `model` may run at once (`Batcher(lanes=...)`), sharing its `threads` intra-op
    threads: `requested` (`--lanes`), else 2 on a CPU with two threads or more.

    On a CPU, two forwards with half the threads each get through more images than one with all of them: the
    threads of one forward meet at a barrier some hundred times a forward, and every time the decoding, the
    HTTP side or anything else preempts one of them, the others wait (bench/results/README.md, fourth session). One
    lane on a GPU (one stream; CUDA graphs replay from shared buffers), under `torch.compile` (inductor fixes its
    kernels' thread count when it compiles them) and where torch's thread count is not per thread.
    """
    from app.accel import per_thread_intra_op, resolve_strategy

    if _on_cuda(model) or not per_thread_intra_op():
        return 1
    try:
        strategy = resolve_strategy(model.compile_mode, torch.device("cpu"))
    except ValueError:  # a mode this CPU cannot build: the model's warm-up reports it
        return 1
    if strategy not in ("eager", "onednn"):
        return 1
    if requested is not None:
        return requested
    return 2 if threads >= 2 else 1


def batch_steps(model: Model, share=None) -> dict[str, Callable]:
    """The `Batcher` arguments for `model`: on CUDA a prepare step (stack, pinned copy, decode, normalise on a
    side stream) that the batcher runs on its own thread beside the forward; on the CPU one step, as nothing
    there would overlap (the forward already uses every core). `share` (an `app.accel.ThreadShare`, with lanes):
    the intra-op threads that every forward running at once in this process shares."""
    if _on_cuda(model):
        return {"run_batch": partial(forward_batch, model), "prepare": partial(prepare_batch, model)}
    if share is not None:
        return {"run_batch": partial(_run_batch_shared, model, share)}
    return {"run_batch": partial(run_batch, model)}


def _run_batch_shared(model: Model, share, items: list[Item]) -> list[object]:
    with share.slot():
        return run_batch(model, items)


def run_batch(model: Model, items: list[Item]) -> list[object]:
    """One forward for `items` (all of one path) -> one CPU result per item, in order."""
    return forward_batch(model, prepare_batch(model, items))


def forward_batch(model: Model, prepared: Prepared) -> list[object]:
    """The forward of a prepared batch (`Batcher`'s forward step) -> one CPU result per item, in order; an item
    that could not be decoded gets its `ImageError` as its result."""
    items = prepared.items
    results: list[object] = [None] * len(items)
    for i, error in prepared.errors.items():
        results[i] = error
    if not prepared.rows:
        return results
    row_items = [items[i] for i in prepared.rows]
    attentions = any(item.task.key == ATTENTION for item in row_items)
    with torch.inference_mode():
        _await_prepared(model, prepared)
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
    """The layers whose attention maps the batch reads: one each for class-token maps, all (None) for the rollout and
    the distances. The other layers keep the fused attention kernel (materialised weights cost a few percent of
    the forward on a CPU, about half of it on a GPU)."""
    layers: set[int] = set()
    for item in items:
        if isinstance(item.task, AttentionMap) and item.task.method == "cls":
            layers.add(item.task.layer % model.config.depth)
        elif item.task.key == ATTENTION:
            return None
    return layers


def _classify(model: Model, out, index: list[int], tasks: list[Classify]) -> list[Predictions]:
    if out.logits is None:
        raise ValueError("this model has no classification head")
    k = max(t.top_k for t in tasks)
    probs = out.logits[index].float().softmax(dim=-1)
    scores, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    scores, indices = scores.cpu().numpy(), indices.cpu().numpy()
    return [Predictions(indices[j, : t.top_k], scores[j, : t.top_k]) for j, t in enumerate(tasks)]


def _embed(model: Model, out, index: list[int], tasks: list[Embed]) -> list[np.ndarray]:
    results: list[np.ndarray] = [np.empty(0)] * len(tasks)
    for pool in sorted({t.pool for t in tasks}):  # the pools may differ in size (CLIP: projected vs token width)
        js = [j for j, t in enumerate(tasks) if t.pool == pool]
        rows = model.pooled(out, pool)[[index[j] for j in js]].float()
        norm = torch.tensor([tasks[j].normalize for j in js], device=rows.device)
        rows = torch.where(norm[:, None], F.normalize(rows, dim=-1), rows)
        for j, row in zip(js, rows.cpu().numpy(), strict=True):
            results[j] = row
    return results


def _rows(maps: list[torch.Tensor | None], index: list[int]) -> list[torch.Tensor | None]:
    """Each computed layer's attention at the batch rows `index`; the maps themselves when that is every row in
    order (the usual batch, of one kind of request), since a copy of every layer's maps costs a few percent of the
    forward."""
    rows = next(a.shape[0] for a in maps if a is not None)
    return maps if index == list(range(rows)) else [None if a is None else a[index] for a in maps]


def _attention_map(model: Model, out, index: list[int], tasks: list[AttentionMap]) -> list[np.ndarray]:
    grid = tuple(model.config.grid)
    maps: list[torch.Tensor | None] = [None] * len(tasks)
    by_kind: dict[tuple, list[int]] = defaultdict(list)
    for j, t in enumerate(tasks):
        by_kind[(t.method, t.layer, t.head) if t.method == "cls" else ("rollout",)].append(j)
    for kind, js in by_kind.items():
        heat = model.attention_heatmap(out, *kind, rows=[index[j] for j in js])[0]
        for j, h in zip(js, heat, strict=True):
            maps[j] = h
    stacked = torch.stack(maps).reshape(len(tasks), *grid).float().cpu().numpy()  # type: ignore[arg-type]
    return list(stacked)


def _attention_distance(model: Model, out, index: list[int], tasks: list[AttentionDistance]) -> list[np.ndarray]:
    attns = _rows(out.attentions, index)
    prefix = model.config.num_prefix_tokens
    dist = analysis.attention_distance(attns, tuple(model.config.grid), model.config.patch_size, prefix)
    return list(dist.float().cpu().numpy())


def _tensors(model: Model, out, index: list[int], tasks: list[Tensors]) -> list[dict[str, np.ndarray]]:
    wanted = {name for t in tasks for name in t.outputs}
    computed: dict[str, np.ndarray] = {}
    if wanted & {"logits", "probabilities"}:
        if out.logits is None:
            raise ValueError("this model has no classification head")
        logits = out.logits[index].float()
        computed["logits"] = logits.cpu().numpy()
        computed["probabilities"] = logits.softmax(dim=-1).cpu().numpy()
    if "embedding" in wanted:
        computed["embedding"] = out.embedding[index].float().cpu().numpy()
    rows = [j for j, t in enumerate(tasks) if "attention_rollout" in t.outputs]
    if rows:  # as /v1/attention?method=rollout: only the rows that asked for it
        heat = model.attention_heatmap(out, "rollout", rows=[index[j] for j in rows])[0]
        heat = heat.reshape(len(rows), *model.config.grid).float().cpu().numpy()
        computed["attention_rollout"] = np.zeros((len(tasks), *heat.shape[1:]), np.float32)
        computed["attention_rollout"][rows] = heat
    return [{name: computed[name][j] for name in t.outputs} for j, t in enumerate(tasks)]


HANDLERS = {
    Classify: _classify,
    Embed: _embed,
    AttentionMap: _attention_map,
    AttentionDistance: _attention_distance,
    Tensors: _tensors,
}


def position_similarity(model: Model) -> np.ndarray:
    """(N, N) cosine similarity of the model's patch position embeddings, on the CPU."""
    with torch.inference_mode():
        prefix = model.config.num_embedded_prefix
        return analysis.position_similarity(model.net.pos_embed.detach(), prefix).float().cpu().numpy()


def warmup_items(model: Model, batch_size: int, key: str, jpeg_decoder: str = "auto") -> list[Item]:
    """Dummy items that exercise one path at one batch size; where `jpeg_decoder` (the --jpeg-decoder choice)
    decodes on the device, the first is a small JPEG, so that nvJPEG is set up before the first request."""
    h, w = model.preprocess_config.output_size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    if key == ATTENTION:
        task: Task = AttentionMap("rollout")
    elif model.config.num_classes > 0:
        task = Classify(1)
    else:
        task = Embed()
    items = [Item(pixels, task)] * batch_size
    if key == FAST and batch_size:
        from app import gpu_decode

        if gpu_decode.use_for(jpeg_decoder, model.device, model.preprocess_config):
            items[0] = Item(_warmup_jpeg(), task)
    return items


def _warmup_jpeg() -> Encoded:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 60, 200)).save(buffer, "JPEG")
    return Encoded(buffer.getvalue(), (64, 48), 1, 64 * 48)
