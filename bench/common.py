"""What the benchmarks share: ViT shapes, one set of random weights for every library, timing, the environment.

Every library gets the same weights: a timm `VisionTransformer` with random weights is created first, and its
state dict is loaded into ours (our names are timm's), into transformers' `ViTForImageClassification` (mapped
here) and into an ONNX export of ours. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the load generator's client processes import this module
    import torch

# name -> (embed_dim, depth, num_heads, mlp_dim, timm architecture)
SHAPES: dict[str, tuple[int, int, int, int, str]] = {
    "ti16": (192, 12, 3, 768, "vit_tiny_patch16_224"),
    "s16": (384, 12, 6, 1536, "vit_small_patch16_224"),
    "b16": (768, 12, 12, 3072, "vit_base_patch16_224"),
}
NUM_CLASSES = 1000


# the families' shapes: name -> (transformers model class, its config, timm architecture, timm num_classes); the
# weights are transformers' random ones, loaded by our engine from the saved folder and into timm from ours
FAMILY_SHAPES: dict[str, tuple[str, dict, str, int]] = {
    "dinov2-s14": (  # DINOv2 S/14 at 224x224 (16x16 patches): layer scale, exact GELU; the final-normed class token
        "Dinov2Model",
        {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4, "patch_size": 14},
        "vit_small_patch14_dinov2",
        0,
    ),
    "dinov2-s14-reg4": (  # the same with 4 register tokens
        "Dinov2WithRegistersModel",
        {
            "hidden_size": 384,
            "num_hidden_layers": 12,
            "num_attention_heads": 6,
            "mlp_ratio": 4,
            "patch_size": 14,
            "num_register_tokens": 4,
        },
        "vit_small_patch14_reg4_dinov2",
        0,
    ),
    "clip-b16": (  # OpenAI's CLIP B/16 image tower: pre-norm, QuickGELU, the 512-d projection as the embedding
        "CLIPVisionModelWithProjection",
        {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "patch_size": 16,
            "projection_dim": 512,
            "hidden_act": "quick_gelu",
        },
        "vit_base_patch16_clip_quickgelu_224",
        512,
    ),
}


def family_hf_model(shape: str, seed: int = 0) -> torch.nn.Module:
    """transformers' model for a family shape, random weights (a fixed seed), SDPA attention, eval mode."""
    import torch
    import transformers

    cls_name, kwargs, _, _ = FAMILY_SHAPES[shape]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(seed)
    model = cls(cls.config_class(image_size=224, **kwargs))
    model.set_attn_implementation("sdpa")
    return model.eval()


def write_family_checkpoint(shape: str, folder: str | Path, seed: int = 0) -> Path:
    """`family_hf_model` saved in transformers' format (with a 224x224 processor config) in `folder`."""
    folder = Path(folder)
    family_hf_model(shape, seed).save_pretrained(folder)
    processor = {
        "do_resize": True,
        "size": {"shortest_edge": 224},
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "resample": 3,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def family_timm_model(shape: str, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """timm's model for a family shape at 224x224 holding `state_dict` (ours, in timm's naming). transformers'
    CLIP projection has no bias where timm's head has one: that bias stays zero."""
    import timm
    import torch

    _, _, arch, num_classes = FAMILY_SHAPES[shape]
    net = timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=224).eval()
    if num_classes:
        torch.nn.init.zeros_(net.head.bias)
    missing, unexpected = net.load_state_dict(state_dict, strict=False)
    if unexpected or set(missing) - {"head.bias"}:
        raise ValueError(f"timm {arch}: missing {missing}, unexpected {unexpected}")
    return net


def vit_config(shape: str, image_size: int = 224, num_classes: int = NUM_CLASSES):
    from app.model import ViTConfig

    dim, depth, heads, mlp, _ = SHAPES[shape]
    return ViTConfig(
        image_size=(image_size, image_size),
        patch_size=16,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp,
        num_classes=num_classes,
    )


def timm_model(shape: str, seed: int = 0, image_size: int = 224) -> torch.nn.Module:
    """timm's VisionTransformer for `shape` with random weights (a fixed seed), in eval mode."""
    import timm
    import torch

    torch.manual_seed(seed)
    arch = SHAPES[shape][4]
    return timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, img_size=image_size).eval()


def random_state_dict(shape: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in timm's (and our native) naming, without timm when it is not installed."""
    try:
        return timm_model(shape, seed).state_dict()
    except ImportError:
        import torch

        from app.model import VisionTransformer

        torch.manual_seed(seed)
        net = VisionTransformer(vit_config(shape))
        torch.nn.init.trunc_normal_(net.head.weight, std=0.02)  # a zero head would make every logit equal
        return net.state_dict()


def write_native_checkpoint(shape: str, folder: str | Path, seed: int = 0, name: str = "model") -> Path:
    """A native vitserve checkpoint with random weights (ImageNet-style preprocessing) in `folder`; shape `micro`:
    a one-block ViT on 32x32 inputs, whose forward costs next to nothing (to time the server around a model)."""
    from app.checkpoints import native
    from app.preprocess import PreprocessConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    if shape == "micro":
        import torch

        from app.model import VisionTransformer, ViTConfig

        torch.manual_seed(seed)
        cfg = ViTConfig(
            image_size=(32, 32), patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=10
        )
        pre = PreprocessConfig.from_dict({"resize": 32, "crop": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3})
        native.save(path, cfg, VisionTransformer(cfg).state_dict(), pre, [f"class_{i}" for i in range(10)])
        return path
    preprocess = PreprocessConfig.from_dict(
        {
            "resize": 248,
            "crop": [224, 224],
            "interpolation": "bicubic",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        }
    )
    labels = [f"class_{i}" for i in range(NUM_CLASSES)]
    native.save(path, vit_config(shape), random_state_dict(shape, seed), preprocess, labels)
    return path


def hf_model(shape: str, state_dict: dict[str, torch.Tensor], attn: str = "sdpa") -> torch.nn.Module:
    """transformers' ViTForImageClassification holding the same weights (timm naming -> transformers')."""
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    dim, depth, heads, mlp, _ = SHAPES[shape]
    cfg = HFConfig(
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=mlp,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=224,
        patch_size=16,
        num_labels=NUM_CLASSES,
        qkv_bias=True,
    )
    cfg._attn_implementation = attn
    model = ViTForImageClassification(cfg).eval()
    model.load_state_dict(timm_to_hf(state_dict, depth, set(model.state_dict())), strict=True)
    return model


def timm_to_hf(sd: dict[str, torch.Tensor], depth: int, hf_keys: set[str]) -> dict[str, torch.Tensor]:
    """Map timm's keys to transformers' ViT keys (both the 4.x `encoder.layer` and the 5.x `layers` layouts)."""
    v5 = "vit.layers.0.attention.q_proj.weight" in hf_keys
    out = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"],
        "vit.layernorm.bias": sd["norm.bias"],
        "classifier.weight": sd["head.weight"],
        "classifier.bias": sd["head.bias"],
    }
    for i in range(depth):
        t = f"blocks.{i}."
        h = f"vit.layers.{i}." if v5 else f"vit.encoder.layer.{i}."
        if v5:
            names = {
                "q": "attention.q_proj",
                "k": "attention.k_proj",
                "v": "attention.v_proj",
                "o": "attention.o_proj",
                "fc1": "mlp.fc1",
                "fc2": "mlp.fc2",
            }
        else:
            names = {
                "q": "attention.attention.query",
                "k": "attention.attention.key",
                "v": "attention.attention.value",
                "o": "attention.output.dense",
                "fc1": "intermediate.dense",
                "fc2": "output.dense",
            }
        for p in ("weight", "bias"):
            q, k, v = sd[t + f"attn.qkv.{p}"].chunk(3, dim=0)
            out[h + f"{names['q']}.{p}"] = q
            out[h + f"{names['k']}.{p}"] = k
            out[h + f"{names['v']}.{p}"] = v
            out[h + f"{names['o']}.{p}"] = sd[t + f"attn.proj.{p}"]
            out[h + f"layernorm_before.{p}"] = sd[t + f"norm1.{p}"]
            out[h + f"layernorm_after.{p}"] = sd[t + f"norm2.{p}"]
            out[h + f"{names['fc1']}.{p}"] = sd[t + f"mlp.fc1.{p}"]
            out[h + f"{names['fc2']}.{p}"] = sd[t + f"mlp.fc2.{p}"]
    return {k: v.clone() for k, v in out.items()}


# -- timing ----------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_s: float
    p90_s: float
    repeats: int

    def as_dict(self, batch: int) -> dict:
        return {
            "batch": batch,
            "images_per_s": round(batch / self.median_s, 2),
            "latency_ms_p50": round(self.median_s * 1e3, 3),
            "latency_ms_p90": round(self.p90_s * 1e3, 3),
            "repeats": self.repeats,
        }


def sync(device: torch.device | str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: str, min_repeats: int, max_seconds: float, warmup: int = 2
) -> dict[str, Timing]:
    """Time several functions round-robin (one call of each per round), so that a change in the machine's load
    during the run hits all of them alike; stop after `max_seconds` once each has `min_repeats` calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    while True:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        n = len(next(iter(times.values())))
        if n >= min_repeats and time.perf_counter() - start > max_seconds:
            break
        if n >= 200:
            break
    return {k: Timing(statistics.median(v), percentile(v, 90), len(v)) for k, v in times.items()}


# -- environment -------------------------------------------------------------------------------------


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX); otherwise bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def environment(device: str) -> dict:
    import torch

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "loadavg_start": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_head(),
        # OpenMP's waiting policy decides how torch's threads behave when other processes share the cores
        "omp_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
    }
    for mod in ("timm", "transformers", "onnxruntime", "litserve", "fastapi", "uvicorn"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def git_head(folder: str | Path | None = None) -> str | None:
    """The short commit checked out in `folder` (default: the current directory), or None outside git."""
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, cwd=folder)
        return out.stdout.strip() or None
    except Exception:
        return None


def exit_on_sigterm() -> None:
    """Turn SIGTERM (a `timeout` running out, say) into SystemExit, so `with` blocks stop the servers we started.

    Only the first SIGTERM raises: later ones are ignored, so a second signal cannot cut that clean-up short
    (`timeout --kill-after` still ends a clean-up that hangs)."""
    import signal

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def write_json(data: dict, path: str | Path | None, echo: bool = True) -> None:
    """`data` as indented JSON to `path` (atomically: a reader, or a run killed mid-write, never sees half a file)
    and, with `echo`, to stdout."""
    text = json.dumps(data, indent=2)
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
    if echo:
        print(text)


def temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table of `columns` for people reading the output."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
