"""SPEC resolution, the model repository, names, the Hub, and every way a file can be wrong."""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import app
from app import load_model
from app.checkpoints import CheckpointError, default_models_dir, list_repository, model_name, read_checkpoint


class Exploit:
    """Unpickling this would create a file: the stand-in for a checkpoint that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def timm_named_state_dict(make_tiny_vit) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in make_tiny_vit().state_dict().items()}  # our names are timm's


# -- resolution -----------------------------------------------------------------------------------


def test_existing_path_folder_name_in_repository_and_named_spec(tiny_models_dir, monkeypatch):
    assert read_checkpoint(str(tiny_models_dir / "alpha")).config.num_classes == 10
    assert read_checkpoint(str(tiny_models_dir / "alpha" / "model.safetensors")).format == "native"
    assert read_checkpoint("beta", models_dir=tiny_models_dir).config.num_classes == 0
    assert read_checkpoint(f"mine={tiny_models_dir / 'alpha'}").source == str(tiny_models_dir / "alpha")
    monkeypatch.chdir(tiny_models_dir)
    assert read_checkpoint("./alpha").config.num_classes == 10  # a relative path


def test_source_is_the_spec_as_given_or_the_repository_folder_name(tiny_models_dir, tmp_path, monkeypatch):
    # a model of the repository reports its folder name, however it was reached; never a machine's path
    assert read_checkpoint(str(tiny_models_dir / "alpha"), models_dir=tiny_models_dir).source == "alpha"
    assert read_checkpoint("beta", models_dir=tiny_models_dir).source == "beta"
    # anything else: the SPEC as the operator wrote it (relative stays relative)
    monkeypatch.chdir(tiny_models_dir.parent)
    spec = f"{tiny_models_dir.name}/alpha/model.safetensors"
    assert read_checkpoint(spec, models_dir=tmp_path).source == spec
    folder = f"{tiny_models_dir.name}/alpha"
    assert read_checkpoint(f"x={folder}", models_dir=tmp_path).source == folder


def test_unknown_spec_lists_the_repository(tiny_models_dir):
    with pytest.raises(CheckpointError, match=r"^gamma: no such file or folder.*\(it holds: beta, alpha\)"):
        read_checkpoint("gamma", models_dir=tiny_models_dir)
    with pytest.raises(CheckpointError, match="it holds: no models"):
        read_checkpoint("gamma", models_dir=tiny_models_dir / "nowhere")


def test_list_repository_default_first_then_by_name(tiny_models_dir, make_native_checkpoint):
    make_native_checkpoint("models/aardvark")
    (tiny_models_dir / "notes").mkdir()  # no checkpoint: not a model
    (tiny_models_dir / ".cache").mkdir()
    shutil.copy(tiny_models_dir / "alpha" / "model.safetensors", tiny_models_dir / ".cache")
    assert [n for n, _ in list_repository(tiny_models_dir)] == ["beta", "aardvark", "alpha"]
    assert list_repository(tiny_models_dir)[0][1] == tiny_models_dir / "beta"
    (tiny_models_dir / "DEFAULT").write_text("nonexistent\n")
    assert [n for n, _ in list_repository(tiny_models_dir)] == ["aardvark", "alpha", "beta"]
    (tiny_models_dir / "DEFAULT").unlink()
    assert [n for n, _ in list_repository(tiny_models_dir)] == ["aardvark", "alpha", "beta"]
    assert list_repository(tiny_models_dir / "missing") == []


def test_default_models_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source_checkout = Path(app.__file__).resolve().parents[1] / "models"
    assert default_models_dir() == source_checkout  # no ./models here, and no app/_models in a source tree
    (tmp_path / "models").mkdir()
    assert default_models_dir() == tmp_path / "models"


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("hf-hub:google/vit-base-patch16-224", "vit-base-patch16-224"),
        ("hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k@main", "vit_base_patch16_224.augreg2_in21k_ft_in1k"),
        ("fast=hf-hub:google/vit-base-patch16-224", "fast"),
        ("some/dir/weights.pth", "weights"),
        ("some/dir/vit-b.safetensors", "vit-b"),
        ("some/dir/my-model/", "my-model"),
        ("mnist-vit", "mnist-vit"),
    ],
)
def test_model_name(spec, name):
    assert model_name(spec) == name


def test_named_spec_keeps_an_existing_path_with_equals(tmp_path):
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert model_name(str(odd)) == "a=b"
    assert model_name("x=y") == "x"


# -- the Hub ------------------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """huggingface_hub with HF_HUB_OFFLINE set and an empty cache of our own (its constants are read per call)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_repo(cache: Path, repo: str, files: list[Path]) -> None:
    """Lay files out as huggingface_hub's cache does (refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in files:
        shutil.copy(f, snapshot / f.name)


def test_hub_offline_error_names_the_spec(offline_hub):
    with pytest.raises(CheckpointError) as err:
        load_model("hf-hub:google/vit-base-patch16-224")
    message = str(err.value)
    assert message.startswith("hf-hub:google/vit-base-patch16-224: ")
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_hub_spec_must_name_org_and_repo():
    with pytest.raises(CheckpointError, match="hf-hub:ORG/NAME"):
        read_checkpoint("hf-hub:just-a-name")


def test_hub_repositories_from_the_cache(offline_hub, perturb, tmp_path):
    """A transformers repo and a timm repo, as the Hub serves them, read from the cache with no network."""
    import timm
    from timm.models._hub import save_for_hf
    from transformers import ViTConfig, ViTForImageClassification

    hf = perturb(ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=16, image_size=16, patch_size=8)))  # fmt: skip
    hf.save_pretrained(tmp_path / "hf")
    cache_repo(offline_hub, "org/tiny-vit", [tmp_path / "hf" / "config.json", tmp_path / "hf" / "model.safetensors"])
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=16, patch_size=8)
    save_for_hf(tm, tmp_path / "timm", safe_serialization=True)
    cache_repo(offline_hub, "timm/tiny", [tmp_path / "timm" / "config.json", tmp_path / "timm" / "model.safetensors"])

    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    cache_repo(
        offline_hub, "org/sharded", [p for p in (tmp_path / "sharded").iterdir() if p.name != "model.safetensors"]
    )

    assert read_checkpoint("hf-hub:org/tiny-vit").format == "hf"
    assert (
        read_checkpoint("hf-hub:org/sharded").state_dict.keys()
        == read_checkpoint("hf-hub:org/tiny-vit").state_dict.keys()
    )
    timm_ckpt = read_checkpoint("hf-hub:timm/tiny")
    assert timm_ckpt.format == "timm" and timm_ckpt.preprocess.interpolation == "bicubic"
    assert timm_ckpt.source == "hf-hub:timm/tiny"


# -- files that are wrong -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "plain pickle"])
def test_malicious_pickle_is_refused_and_never_runs(how, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"patch_embed.proj.weight": torch.zeros(1), "x": Exploit(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match=r"evil\.pth .*vitserve refuses") as err:
        read_checkpoint(str(path))
    if how == "torch.save":  # the unpickler names what it refused
        assert "holds pickled objects other than tensors (io.open)" in str(err.value)
    assert not marker.exists()


def test_truncated_and_corrupt_files_are_named(tmp_path, make_tiny_vit):
    state_dict = timm_named_state_dict(make_tiny_vit)
    save_file(state_dict, tmp_path / "full.safetensors")
    torch.save(state_dict, tmp_path / "full.pth")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    cases = {
        "cut.safetensors": "cut.safetensors is not a readable safetensors file",
        "cut.pth": "cut.pth is not a readable PyTorch checkpoint",
        "empty.bin": "empty.bin is empty",
        "noise.pt": "noise.pt is not a (readable )?PyTorch checkpoint",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as err:
            load_model(str(tmp_path / name))
        assert str(err.value).startswith(str(tmp_path / name))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_any_garbage_pickle_is_a_checkpoint_error(tmp_path):
    """Random bytes make torch's safe unpickler fail in many ways (about 6% of them with an IndexError, which once
    escaped as itself): every one must come out as a `CheckpointError` naming the file."""
    path = tmp_path / "noise.pt"
    for seed in range(400):
        path.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(CheckpointError, match=r"noise\.pt is not a (readable )?PyTorch checkpoint"):
            read_checkpoint(str(path))


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        read_checkpoint(str(tmp_path / "list.pth"))
    torch.save({"weights": torch.zeros(2), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="non-tensor entries: epoch"):
        read_checkpoint(str(tmp_path / "mixed.pth"))
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="match no layout"):
        read_checkpoint(str(tmp_path / "other.safetensors"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a weight file"):
        read_checkpoint(str(tmp_path / "notes.txt"))


def test_folders_without_one_clear_checkpoint(tmp_path, make_tiny_vit):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        read_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "two").mkdir()
    state_dict = timm_named_state_dict(make_tiny_vit)
    save_file(state_dict, tmp_path / "two" / "a.safetensors")
    torch.save(state_dict, tmp_path / "two" / "b.pth")
    with pytest.raises(CheckpointError, match=r"several weight files \(a.safetensors, b.pth\)"):
        read_checkpoint(str(tmp_path / "two"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        read_checkpoint(str(tmp_path / "other"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", r"missing keys: blocks\.1\.mlp\.fc2\.bias"),
        ("unexpected", r"unexpected keys: blocks\.0\.attn\.extra"),
        ("shape", r"shape mismatches: head\.bias \(9,\) != \(10,\)"),
    ],
)
def test_strict_loading_names_the_keys(change, message, tmp_path, make_tiny_vit):
    state_dict = timm_named_state_dict(make_tiny_vit)
    if change == "missing":
        del state_dict["blocks.1.mlp.fc2.bias"]
    elif change == "unexpected":
        state_dict["blocks.0.attn.extra"] = torch.zeros(3)
    else:
        state_dict["head.bias"] = state_dict["head.bias"][:9].clone()
    save_file(state_dict, tmp_path / "w.safetensors")
    (tmp_path / "config.json").write_text('{"num_heads": 2}')
    with pytest.raises(CheckpointError, match=message):
        load_model(str(tmp_path / "w.safetensors"))


class Command:
    """Unpickling this would run a shell command: a global from a module torch's safe unpickler blocks outright."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_a_blocked_global_is_named_in_the_refusal(tmp_path):
    path = tmp_path / "command.pth"
    torch.save({"x": Command()}, path)
    with pytest.raises(CheckpointError, match=r"command\.pth holds pickled objects other than tensors") as err:
        read_checkpoint(str(path))
    assert f"({os.system.__module__}.system)" in str(err.value)  # posix.system on Linux
    assert "corrupt?" not in str(err.value)
