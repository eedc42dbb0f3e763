"""`hf-hub:ORG/NAME[@REVISION]` -> a local folder, through huggingface_hub (its cache, its offline mode).

Only the files a reader needs are fetched: config.json, preprocessor_config.json when there is one, and the
weights (model.safetensors, else pytorch_model.bin, else the shards that model.safetensors.index.json lists).
A transformers repository (config.json with model_type "vit") then reads as an HF folder; a timm repository
(config.json naming an "architecture") as a timm state dict with that config beside it. Without a network,
files already in the cache are used; otherwise the error names the spec and says the Hub could not be reached.
"""

from __future__ import annotations

import json
from pathlib import Path

from app.checkpoints.base import CheckpointError

PREFIX = "hf-hub:"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEX = "model.safetensors.index.json"


def parse(spec: str) -> tuple[str, str | None]:
    """Split a Hub spec: "hf-hub:org/name@rev" -> ("org/name", "rev")."""
    repo = spec.removeprefix(PREFIX).strip()
    repo, _, revision = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CheckpointError(f"{spec}: a Hub spec is hf-hub:ORG/NAME (optionally @REVISION)")
    return repo, revision or None


def download(spec: str) -> Path:
    """The local snapshot folder holding the repository's config, preprocessing config and weights."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    repo, revision = parse(spec)

    def fetch(filename: str, required: bool) -> Path | None:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except EntryNotFoundError:  # includes "not in the local cache" when offline
            if required:
                raise
            return None

    try:
        config = fetch("config.json", required=True)
        fetch("preprocessor_config.json", required=False)
        weights = next((w for w in WEIGHTS if fetch(w, required=False) is not None), None)  # the first that exists
        if weights is None:  # a sharded checkpoint: the index, then every shard it lists
            index = fetch(SHARD_INDEX, required=False)
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values())) if index else []
            for shard in shards:
                fetch(shard, required=True)
            weights = SHARD_INDEX if shards else None
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        if constants.is_offline_mode():
            raise CheckpointError(
                f"{spec}: the Hugging Face Hub is off (HF_HUB_OFFLINE is set) and {repo} is not in the local cache"
            ) from None
        raise CheckpointError(
            f"{spec}: cannot fetch {repo} from the Hugging Face Hub (offline, unknown repository or no access?): "
            f"{_first_line(e)}"
        ) from None
    if not weights:
        raise CheckpointError(f"{spec}: the repository {repo} has none of {', '.join((*WEIGHTS, SHARD_INDEX))}")
    return config.parent


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
