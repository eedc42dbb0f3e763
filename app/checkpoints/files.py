"""Reading weight files safely: safetensors, or pickles through `torch.load(weights_only=True)` only.

Every failure becomes a `CheckpointError` that names the spec and the file: a truncated or corrupt file,
a pickle that would run code, a file that holds no tensors. Trainers' wrappers are unwrapped here, once,
for every format.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from app.checkpoints.base import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Keys under which trainers nest the model's state dict (checked in this order, repeatedly).
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
# Prefixes that wrappers add to every parameter name: DataParallel / DDP, and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# torch names the refused global as "Unsupported global: GLOBAL x.y" (not allowlisted) or, for a blocked module
# such as os or posix, "unsupported GLOBAL x.y whose module x is blocked"
UNSAFE_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)
UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


def load_tensors(path: Path, source: str) -> dict[str, torch.Tensor]:
    """The state dict in `path` (any of WEIGHT_SUFFIXES), unwrapped, on the CPU."""
    if not path.is_file():
        raise CheckpointError(f"{source}: {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{source}: {path.name} is empty")
    if path.suffix == ".safetensors":
        return unwrap(_load_safetensors(path, source), source, path)
    return unwrap(_load_pickle(path, source), source, path)


def _load_safetensors(path: Path, source: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{source}: {path.name} is not a readable safetensors file ({e})") from None


def _load_pickle(path: Path, source: str) -> object:
    if _is_torchscript(path):
        raise CheckpointError(
            f"{source}: {path.name} is a TorchScript archive (as OpenAI's CLIP .pt files are), which vitserve does not "
            f"load; convert it to a state dict, e.g. with open_clip: model, _, _ = "
            f"open_clip.create_model_and_transforms('ViT-B-16-quickgelu', pretrained='{path}'), then "
            f"torch.save(model.state_dict(), 'clip.pt') (or save it as .safetensors)"
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        found = UNSAFE_GLOBAL.search(str(e))
        if found is None:  # not a torch.save file: a pickle the safe unpickler cannot read, or garbage
            detail = UNPICKLER_ERROR.search(str(e))
            raise CheckpointError(
                f"{source}: {path.name} is not a PyTorch checkpoint that torch.load(weights_only=True) can read, "
                f"so vitserve refuses it ({detail.group(1).strip() if detail else 'corrupt?'}); "
                f"re-save the state dict with torch.save or as .safetensors"
            ) from None
        # weights_only refuses every global it does not know: code, but also e.g. an argparse Namespace
        raise CheckpointError(
            f"{source}: {path.name} holds pickled objects other than tensors ({found.group(1)}), which vitserve "
            f"refuses to load (torch.load weights_only=True); re-save only the state dict, or convert to .safetensors"
        ) from None
    except Exception as e:
        # Any failure to parse the file means it cannot be read: on garbage, torch's safe unpickler raises
        # whatever its state machine hits (IndexError, KeyError, ValueError, EOFError, zipfile errors, ...).
        raise CheckpointError(
            f"{source}: {path.name} is not a readable PyTorch checkpoint (truncated or corrupt? {_first_line(e)})"
        ) from None


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save writes a zip like torch.save's, plus the model's code and constants."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _is_zip(path: Path) -> bool:
    """torch.save's zip format can be memory-mapped; the legacy format cannot."""
    return zipfile.is_zipfile(path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def unwrap(obj: object, source: str, path: Path) -> dict[str, torch.Tensor]:
    """Peel trainers' wrappers ({"state_dict": ...}, {"model": ...}, "module." prefixes) off a state dict."""
    for _ in range(4):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: {path.name} holds no state dict (found {type(obj).__name__})")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(
            f"{source}: {path.name} is not a state dict of tensors (non-tensor entries: {', '.join(not_tensors[:5])})"
        )
    state_dict = {str(k): v for k, v in obj.items()}
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items()}
    return state_dict


def read_json(path: Path, source: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: {path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: {path.name} does not hold a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The weight files directly inside `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
