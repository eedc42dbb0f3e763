"""SPEC -> Checkpoint: resolve the spec to files, detect their format, hand them to that format's reader.

Resolution (API.md): `hf-hub:ORG/NAME` -> the Hub; an existing path -> that folder or file; a folder name
inside the model repository -> that folder; anything else -> an error listing the repository's models.
A `NAME=SPEC` prefix is accepted and dropped (unless the whole string is an existing path).

Detection, for a folder: config.json with model_type "vit" -> transformers; config.json naming a timm
"architecture" -> timm, with that config; otherwise its single weight file (or model.safetensors /
pytorch_model.bin among several, or the one native file). For a file: our native format (vitserve
metadata), else by its keys: transformers (`embeddings.patch_embeddings...`), torchvision (`conv_proj`,
`encoder.layers.encoder_layer_N`), timm (`patch_embed`, `blocks.N`), with a config.json beside it used
for what the keys cannot tell. `arch` only matters where the files leave something open (bare timm or
torchvision state dicts, transformers weights without a config.json); native files describe themselves.

The model repository (`--models-dir`, default `default_models_dir()`) is a folder of model folders: every
sub-folder holding a checkpoint (a config.json or a .safetensors/.pth/.pt/.bin file) is a model named after
the folder. The bundled default is named by a text file `DEFAULT` in the repository (its first line is a
folder name, e.g. `mnist-vit`); `list_repository` puts it first and sorts the rest by name. Without a
`DEFAULT` file (or when it names no model folder) the order is simply by name.
"""

from __future__ import annotations

from pathlib import Path

from app.checkpoints import hf, hf_families, hub, native, open_clip, timm, torchvision
from app.checkpoints.base import Checkpoint, CheckpointError
from app.checkpoints.files import WEIGHT_SUFFIXES, load_tensors, read_json, weight_files
from app.settings import split_name

DEFAULT_MARKER = "DEFAULT"
PREFERRED_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


# -- names and the model repository ------------------------------------------------------------------


def model_name(spec: str) -> str:
    """The name a SPEC is served under: NAME of NAME=SPEC, else the folder's name, the file's stem,
    or the last part of a hub id."""
    name, spec = split_name(spec)
    if name:
        return name
    if spec.startswith(hub.PREFIX):
        repo, _ = hub.parse(spec)
        return repo.rsplit("/", 1)[-1]
    path = Path(spec).expanduser()
    if path.suffix in WEIGHT_SUFFIXES and not path.is_dir():
        return path.stem
    return path.name or path.resolve().name


def default_models_dir() -> Path:
    """`./models` where it exists; else the repository shipped in the package (app/_models in a wheel),
    or, in a source checkout, the repository's own models/ folder."""
    here = Path.cwd() / "models"
    if here.is_dir():
        return here
    package = Path(__file__).resolve().parents[1]  # .../app
    packaged = package / "_models"
    return packaged if packaged.is_dir() else package.parent / "models"


def holds_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and ((folder / "config.json").is_file() or bool(weight_files(folder)))


def list_repository(models_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """(name, folder) of every model in the repository, the bundled default first, then by name."""
    repo = Path(models_dir) if models_dir is not None else default_models_dir()
    if not repo.is_dir():
        return []
    models = sorted((d.name, d) for d in repo.iterdir() if not d.name.startswith(".") and holds_checkpoint(d))
    default = _default_name(repo)
    return sorted(models, key=lambda m: m[0] != default)  # stable: the rest keep their order


def _default_name(repo: Path) -> str | None:
    marker = repo / DEFAULT_MARKER
    if not marker.is_file():
        return None
    lines = [line.strip() for line in marker.read_text(encoding="utf-8", errors="replace").splitlines()]
    return next((line for line in lines if line), None)


# -- reading -------------------------------------------------------------------------------------------


def read_checkpoint(spec: str, arch: str | None = None, models_dir: str | Path | None = None) -> Checkpoint:
    """The checkpoint a SPEC names, in our parameter names, or a CheckpointError naming the spec."""
    _, spec = split_name(spec.strip())
    if spec.startswith(hub.PREFIX):
        return read_path(hub.download(spec), spec, arch)
    path = Path(spec).expanduser()
    repo = Path(models_dir) if models_dir is not None else default_models_dir()
    if path.exists():
        in_repo = path.is_dir() and path.resolve().parent == repo.resolve()
        return read_path(path, path.resolve().name if in_repo else spec, arch)  # a repository model: its name
    if spec and holds_checkpoint(repo / spec):
        return read_path(repo / spec, spec, arch)
    names = ", ".join(name for name, _ in list_repository(repo)) or "no models"
    raise CheckpointError(
        f"{spec}: no such file or folder, and no model of that name in the model repository {repo} (it holds: {names})"
    )


def read_path(path: Path, source: str, arch: str | None = None) -> Checkpoint:
    """A checkpoint folder or file, its format detected."""
    if path.is_dir():
        return _read_folder(path, source, arch)
    return read_file(path, source, arch)


def _read_folder(folder: Path, source: str, arch: str | None) -> Checkpoint:
    config_path = folder / "config.json"
    config = read_json(config_path, source) if config_path.is_file() else None
    if config is not None and hf.is_hf_config(config):
        return hf.read_folder(folder, source)
    if config is not None and hf_families.is_family_config(config):
        return hf_families.read_folder(folder, source)
    if config is not None and "model_type" in config and not timm.is_timm_config(config):
        raise CheckpointError(f"{source}: {_unsupported_model_type(config['model_type'])}")
    files = weight_files(folder)
    if not files:
        raise CheckpointError(
            f"{source}: {folder} holds no checkpoint (a transformers folder, or a .safetensors, .pth, .pt or .bin file)"
        )
    preferred = [folder / n for n in PREFERRED_WEIGHTS if folder / n in files]
    natives = [f for f in files if native.is_native(f)] if len(files) > 1 else []
    if len(files) == 1:
        return read_file(files[0], source, arch)
    if preferred:
        return read_file(preferred[0], source, arch)
    if len(natives) == 1:
        return read_file(natives[0], source, arch)
    raise CheckpointError(
        f"{source}: {folder} holds several weight files ({', '.join(f.name for f in files)}); give the path of one"
    )


def _unsupported_model_type(model_type: str) -> str:
    if why := hf_families.refused_type(model_type):
        return f"config.json has model_type {model_type!r}: {why}, which vitserve does not support"
    known = ", ".join(("vit", *hf_families.MODEL_TYPES))
    return f"config.json has model_type {model_type!r}; vitserve reads transformers models of type {known}"


def read_file(path: Path, source: str, arch: str | None = None) -> Checkpoint:
    """A single weight file: native, or a state dict in transformers, torchvision or timm naming."""
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{source}: {path.name} is not a weight file ({', '.join(WEIGHT_SUFFIXES)})")
    if native.is_native(path):
        return native.load(path, source)
    state_dict = load_tensors(path, source)
    side_path = path.parent / "config.json"
    side = read_json(side_path, source) if side_path.is_file() else None
    keys = list(state_dict)
    if hf.is_hf_state_dict(keys):
        return hf.read_file(path, state_dict, side, source, arch)
    if open_clip.is_open_clip_state_dict(keys):
        return open_clip.read(path, state_dict, arch, source)
    if torchvision.is_torchvision_state_dict(keys):
        return torchvision.read(path, state_dict, arch, side, source)
    if timm.is_timm_state_dict(keys):
        return timm.read(path, state_dict, arch, side, source)
    raise CheckpointError(
        f"{source}: the keys of {path.name} match no layout vitserve reads (transformers, timm, torchvision ViT); "
        f"first keys: {', '.join(keys[:5])}"
    )
