"""What a forward is for: the per-image tasks of the /v1 and /v2 endpoints, computed for a whole batch on the device.

`run_batch(model, items)` is the callable a `Batcher` runs on its forward thread: it stacks the uint8
pixels, normalises them on the model's device, runs the fast path (no attention maps) or the attention
path, and returns one small CPU result per item (top-k predictions, an embedding, a heatmap, distances).

Items normally carry uint8 pixels that are normalised here; the Open Inference Protocol's FP32 input
brings float32 (3, H, W) pixels that are already preprocessed. Such items travel under their own batch
key (`batch_key`), so one forward never mixes the two.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from app import analysis
from app.transfer import stack_host

FAST = "fast"
ATTENTION = "attention"


@dataclass(frozen=True)
class Classify:
    top_k: int
    key = FAST


@dataclass(frozen=True)
class Embed:
    pool: Literal["cls", "mean"] = "cls"
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


TENSOR_OUTPUTS = ("probabilities", "logits", "embedding", "attention_rollout")


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
    pixels: np.ndarray  # uint8 (h, w, 3) at the model's input size, or float32 (3, H, W) already preprocessed
    task: Task


def batch_key(item: Item) -> Hashable:
    """The batcher key: the task's path, kept apart for already-preprocessed float pixels."""
    return item.task.key if item.pixels.dtype == np.uint8 else (item.task.key, PREPROCESSED)


@dataclass
class Prepared:
    """A batch made ready for the forward: the model's input on its device (in its dtype), and on CUDA the
    event to wait for (the input was made on a side stream)."""

    items: list[Item]
    inputs: torch.Tensor  # (B, 3, H, W)
    ready: torch.cuda.Event | None = None


class _DeviceState:
    """Per model, on CUDA: the side stream that batches are prepared on, and the pinned staging buffers."""

    def __init__(self, device: torch.device):
        from app.transfer import PinnedStager

        self.stream = torch.cuda.Stream(device)
        self.stager = PinnedStager(device)


def _on_cuda(model) -> bool:  # type: ignore[no-untyped-def]
    return getattr(getattr(model, "device", None), "type", "cpu") == "cuda"


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _device_state(model) -> _DeviceState:  # type: ignore[no-untyped-def]
    with _STATES_LOCK:
        state = _STATES.get(model)
        if state is None:
            state = _STATES[model] = _DeviceState(model.device)
        return state


def model_input(model, items: list[Item]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The batch as the model's float input (on the current stream): uint8 normalised on the device, float as is."""
    prepared = prepare_batch(model, items)
    _await_prepared(model, prepared)
    return prepared.inputs


def prepare_batch(model, items: list[Item]) -> Prepared:  # type: ignore[no-untyped-def]
    """Stack, copy and normalise a batch (`Batcher`'s prepare step; it may run on another thread than the
    forward). On CUDA all of it is enqueued on a side stream, from pinned memory, without blocking the host."""
    kinds = {item.pixels.dtype for item in items}
    if len(kinds) != 1:
        raise ValueError(f"one batch mixes pixel types {sorted(map(str, kinds))}; batch them apart (batch_key)")
    arrays = [item.pixels for item in items]
    dtype = getattr(model, "dtype", torch.float32)
    if not _on_cuda(model):
        stacked = stack_host(arrays)  # zero-copy beyond the stack itself
        if stacked.dtype == torch.uint8:
            return Prepared(items, model.normalize(stacked, dtype))
        return Prepared(items, stacked.to(model.device, dtype))
    state = _device_state(model)
    with torch.inference_mode(), torch.cuda.stream(state.stream):
        if arrays[0].dtype == np.uint8:
            pixels = state.stager.upload(arrays, state.stream)  # (B, h, w, 3) uint8, copied without blocking
            inputs = model.normalize(pixels, dtype)  # one fused kernel, on the side stream
        else:  # the Open Inference Protocol's FP32 pixels: rare, pageable memory is good enough
            inputs = stack_host(arrays).to(model.device, dtype)
        ready = torch.cuda.Event()
        ready.record(state.stream)
    return Prepared(items, inputs, ready)


def _await_prepared(model, prepared: Prepared) -> None:  # type: ignore[no-untyped-def]
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


def batch_steps(model) -> dict[str, Callable]:  # type: ignore[no-untyped-def]
    """The `Batcher` arguments for `model`: on CUDA a prepare step (stack, pinned copy, decode, normalise on a
    side stream) that the batcher runs on its own thread beside the forward; on the CPU one step, as nothing
    there would overlap (the forward already uses every core)."""
    if _on_cuda(model):
        return {"run_batch": partial(forward_batch, model), "prepare": partial(prepare_batch, model)}
    return {"run_batch": partial(run_batch, model)}


def run_batch(model, items: list[Item]) -> list[object]:  # type: ignore[no-untyped-def]
    """One forward for `items` (all of one path) -> one CPU result per item, in order."""
    return forward_batch(model, prepare_batch(model, items))


def forward_batch(model, prepared: Prepared) -> list[object]:  # type: ignore[no-untyped-def]
    """The forward of a prepared batch (`Batcher`'s forward step) -> one CPU result per item, in order."""
    items = prepared.items
    attentions = any(item.task.key == ATTENTION for item in items)
    with torch.inference_mode():
        _await_prepared(model, prepared)
        out = model(prepared.inputs, attentions=attentions)
        results: list[object] = [None] * len(items)
        groups: dict[type, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[type(item.task)].append(i)
        for kind, index in groups.items():
            tasks = [items[i].task for i in index]
            for i, result in zip(index, HANDLERS[kind](model, out, index, tasks), strict=True):
                results[i] = result
    return results


def _classify(model, out, index: list[int], tasks: list[Classify]) -> list[Predictions]:  # type: ignore[no-untyped-def]
    if out.logits is None:
        raise ValueError("this model has no classification head")
    k = max(t.top_k for t in tasks)
    probs = out.logits[index].float().softmax(dim=-1)
    scores, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    scores, indices = scores.cpu().numpy(), indices.cpu().numpy()
    return [Predictions(indices[j, : t.top_k], scores[j, : t.top_k]) for j, t in enumerate(tasks)]


def _embed(model, out, index: list[int], tasks: list[Embed]) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    rows = out.embedding[index].float()  # (n, D) class tokens
    if any(t.pool == "mean" for t in tasks):  # decided on the host: no device sync
        mean = torch.tensor([t.pool == "mean" for t in tasks], device=rows.device)
        rows = torch.where(mean[:, None], out.tokens[index, 1:].float().mean(dim=1), rows)
    if any(t.normalize for t in tasks):
        norm = torch.tensor([t.normalize for t in tasks], device=rows.device)
        rows = torch.where(norm[:, None], F.normalize(rows, dim=-1), rows)
    return list(rows.cpu().numpy())


def _attention_map(model, out, index: list[int], tasks: list[AttentionMap]) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    grid = tuple(model.config.grid)
    attns = [a[index] for a in out.attentions]
    maps: list[torch.Tensor | None] = [None] * len(tasks)
    by_kind: dict[tuple, list[int]] = defaultdict(list)
    for j, t in enumerate(tasks):
        by_kind[(t.method, t.layer, t.head) if t.method == "cls" else ("rollout",)].append(j)
    for kind, js in by_kind.items():
        sub = [a[js] for a in attns]
        heat = analysis.rollout(sub) if kind[0] == "rollout" else analysis.cls_attention(sub, kind[1], kind[2])
        for j, h in zip(js, heat, strict=True):
            maps[j] = h
    stacked = torch.stack(maps).reshape(len(tasks), *grid).float().cpu().numpy()  # type: ignore[arg-type]
    return list(stacked)


def _attention_distance(model, out, index: list[int], tasks: list[AttentionDistance]) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    attns = [a[index] for a in out.attentions]
    dist = analysis.attention_distance(attns, tuple(model.config.grid), model.config.patch_size)
    return list(dist.float().cpu().numpy())


def _tensors(model, out, index: list[int], tasks: list[Tensors]) -> list[dict[str, np.ndarray]]:  # type: ignore[no-untyped-def]
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
        attns = [a[index][rows] for a in out.attentions]
        heat = analysis.rollout(attns).reshape(len(rows), *model.config.grid).float().cpu().numpy()
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


def position_similarity(model) -> np.ndarray:  # type: ignore[no-untyped-def]
    """(N, N) cosine similarity of the model's patch position embeddings, on the CPU."""
    with torch.inference_mode():
        return analysis.position_similarity(model.net.pos_embed.detach()).float().cpu().numpy()


def warmup_items(model, batch_size: int, key: str) -> list[Item]:  # type: ignore[no-untyped-def]
    """Dummy items that exercise one path at one batch size."""
    h, w = model.preprocess_config.output_size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    if key == ATTENTION:
        task: Task = AttentionMap("rollout")
    elif model.config.num_classes > 0:
        task = Classify(1)
    else:
        task = Embed()
    return [Item(pixels, task)] * batch_size
