"""How many of timm's `vit_*` / `deit_*` architectures vitserve loads, and why the others are refused.

Each architecture is built by timm on the meta device (no weights, no memory); its state dict (meta tensors: names
and shapes) goes through vitserve's timm reader with `--arch NAME`, and our ViT is built on the meta device from the
resulting config and must take exactly those keys and shapes (strict loading). Refusals must be CheckpointErrors.

Usage: PYTHONPATH=. python scripts/count_timm_archs.py [-v]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import timm
import torch

from app.checkpoints import CheckpointError
from app.checkpoints import timm as timm_reader
from app.model import VisionTransformer


def try_arch(name: str) -> str | None:
    """None when vitserve loads `name`'s weights, else why not."""
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
    state_dict = dict(ref.state_dict())
    try:
        ckpt = timm_reader.read(Path(f"{name}.safetensors"), state_dict, name, None, name)
    except CheckpointError as e:
        return str(e).removeprefix(f"{name}: ")
    with torch.device("meta"):
        ours = VisionTransformer(ckpt.config)
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in ckpt.state_dict.items()}
    if expected != given:
        diff = sorted(set(expected.items()) ^ set(given.items()))
        raise AssertionError(f"{name}: read but does not load: {diff[:4]}")
    return None


def count() -> tuple[list[str], dict[str, str]]:
    loaded, refused = [], {}
    for name in timm.list_models(["vit_*", "deit_*"]):
        why = try_arch(name)
        if why is None:
            loaded.append(name)
        else:
            refused[name] = why
    return loaded, refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    loaded, refused = count()
    print(f"{len(loaded)} of {len(loaded) + len(refused)} timm architectures load; {len(refused)} refused")
    reasons = collections.Counter(
        why.partition(" has ")[2].removesuffix(", which vitserve does not support") for why in refused.values()
    )
    for why, n in reasons.most_common():
        print(f"  {n:3d}  {why}")
    if args.verbose:
        for name, why in sorted(refused.items()):
            print(f"{name}: {why}")


if __name__ == "__main__":
    main()
