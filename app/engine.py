"""The engine: `load_model(spec)` -> `Model`, a ViT on a device that preprocesses and runs batches.

Nothing here knows about HTTP or batching; the server and the Python API share this code.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app import analysis
from app.checkpoints import Checkpoint, CheckpointError, read_checkpoint
from app.model import VisionTransformer, ViTConfig, resample_pos_embed
from app.model.float8 import float8_problem, to_float8
from app.preprocess import PreprocessConfig, preprocess_for_size, to_model_pixels

log = logging.getLogger("vitserve")

# name -> the dtype of the weights and activations; float8 multiplies in float8 around bfloat16 (app.model.float8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float8": torch.bfloat16}


POOLS = ("default", "cls", "mean")  # what `Model.pooled` (and /v1/embed's pool) accepts


@dataclass
class Output:
    logits: torch.Tensor | None  # (B, num_classes), float32, or None without a classifier
    embedding: torch.Tensor  # (B, embedding_dim) float32: the family's default embedding (ModelInfo "pool")
    tokens: torch.Tensor  # (B, P + gh*gw, D) float32: every final-normed token, P prefix tokens first
    attentions: list[torch.Tensor | None] | None = None  # depth x (B, heads, T, T) float32, when asked
    probe_attention: torch.Tensor | None = None  # (B, heads, 1, gh*gw) float32: a MAP head's probe, with attentions


class Normalizer(torch.nn.Module):
    """uint8 (B, h, w, 3) -> (B, 3, h, w), (x / 255 - mean) / std, on whatever device it lives.

    Computed as one fused multiply-add, x * scale + shift with scale = 1 / (255 std) and shift = -mean / std,
    in float32 and written straight into the output's dtype (the model's, e.g. bfloat16): one kernel from uint8
    to the model's input instead of a conversion, three arithmetic passes and a cast.
    """

    def __init__(self, cfg: PreprocessConfig):
        super().__init__()
        mean = torch.tensor(cfg.mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, dtype=torch.float64).view(1, 3, 1, 1)
        self.register_buffer("scale", (1.0 / (255.0 * std)).float(), persistent=False)
        self.register_buffer("shift", (-mean / std).float(), persistent=False)

    def forward(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2)  # a view: the kernel reads channels-last and writes channels-first
        return self.into(x, torch.empty(x.shape, dtype=dtype, device=x.device))

    def into(self, pixels: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, h, w) (any strides) -> `out` (B, 3, h, w) of any float dtype, normalised; returns `out`."""
        return torch.addcmul(self.shift, pixels, self.scale, out=out)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {[*DTYPES, 'auto']}")
    return DTYPES[dtype]


def file_sha256(path: Path | None) -> str:
    if path is None:
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_strict(model: VisionTransformer, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy weights into `model`, refusing any missing, unexpected or mis-shaped key by name."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
    if mis_shaped:
        problems.append(f"shape mismatches: {'; '.join(mis_shaped[:10])}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def build_model(ckpt: Checkpoint, image_size: int | tuple[int, int] | None) -> VisionTransformer:
    """A VisionTransformer holding the checkpoint's weights, at `image_size` when given."""
    config = ckpt.config
    state_dict = dict(ckpt.state_dict)
    image_size = image_size if image_size is not None else ckpt.serve_size
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if size[0] % config.patch_size or size[1] % config.patch_size:
            raise CheckpointError(
                f"{ckpt.source}: image size {size} is not a multiple of the patch size {config.patch_size}"
            )
        new_config = ViTConfig.from_dict({**config.to_dict(), "image_size": size})
        if "pos_embed" in state_dict:
            state_dict["pos_embed"] = resample_pos_embed(
                state_dict["pos_embed"],
                config.grid,
                new_config.grid,
                num_prefix=config.num_embedded_prefix,
                antialias=ckpt.pos_antialias,
            )
        config = new_config
    with torch.device("meta"):
        model = VisionTransformer(config)  # no random init: every weight comes from the checkpoint
    model = model.to_empty(device="cpu")
    load_strict(model, state_dict, ckpt.source)
    return model.eval()


class Model:
    """A loaded ViT: `preprocess` images, call it on pixels, read `info`."""

    def __init__(
        self,
        ckpt: Checkpoint,
        net: VisionTransformer,
        device: torch.device,
        dtype: torch.dtype,
        float8: bool = False,
    ):
        self.checkpoint_format = ckpt.format
        self.source = ckpt.source
        self.config = net.cfg
        self.device = device
        self.dtype = dtype  # of the activations (and of the input the forward takes)
        self.float8 = float8  # the blocks' linear layers multiply in float8 (--dtype float8)
        self.net = net.to(device=device, dtype=dtype)
        if float8:
            to_float8(self.net)
        if device.type == "cuda" and dtype == torch.float32:
            # float32 means float32: cuDNN runs convolutions (the patch projection) in TF32 unless told not to
            # (matmuls are float32 by default), which would put the logits ~1e-3 away from the CPU and the libraries
            torch.backends.cudnn.allow_tf32 = False
        self.preprocess_config = preprocess_for_size(ckpt.preprocess, self.config.image_size)
        self.normalizer = Normalizer(self.preprocess_config).to(device)
        self.num_classes = 0 if self.config.projection else self.config.num_classes  # a projection classifies nothing
        n = self.num_classes
        self.labels = ckpt.labels if len(ckpt.labels) == n else [f"class_{i}" for i in range(n)]
        self.sha256 = file_sha256(ckpt.weights_path)

    # -- preprocessing -------------------------------------------------------------------------
    def to_pixels(self, image: Image.Image) -> np.ndarray:
        """One RGB image -> uint8 (h, w, 3) at the input size (the CPU half of preprocessing)."""
        return to_model_pixels(image, self.preprocess_config)

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 (B, h, w, 3) -> normalised (B, 3, h, w) in `dtype` (float32, or the model's own dtype to skip a
        cast), on the model's device. Only uint8 crosses to the device; see `app.transfer` for the pinned path."""
        return self.normalizer(pixels.to(self.device, non_blocking=True), dtype)

    def normalize_into(self, pixels: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, h, w) already on the device (any strides) -> normalised into `out` (its dtype); no
        allocation, so one batch's rows from different sources fill one input tensor."""
        return self.normalizer.into(pixels, out)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> float32 (B, 3, H, W) pixels, on the model's device."""
        batch = np.stack([self.to_pixels(img.convert("RGB")) for img in images])
        return self.normalize(torch.from_numpy(batch))

    # -- forward -------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor, attentions: bool = False, layers: Collection[int] | None = None) -> Output:
        """The forward; with `attentions`, every layer's attention maps, or only those of `layers` (0-based; the
        others are None and run the fused attention kernel)."""
        x = pixels.to(self.device, self.dtype, non_blocking=True)
        features = self.net.forward_features(x, attentions=attentions, layers=layers)
        return self.output(features.tokens, self.net.forward_head(features.tokens), features.attentions)

    def fast_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pixels -> (final-normed tokens, logits or None) without attention weights: what a CUDA graph captures."""
        tokens = self.net.forward_features(x).tokens
        return tokens, self.net.forward_head(tokens)

    def output(
        self, tokens: torch.Tensor, logits: torch.Tensor | None, maps: list[torch.Tensor | None] | None = None
    ) -> Output:
        """The forward's results in float32, as the Python API gives them: the default embedding is computed here
        from the tokens (the pooling and projection are small next to the blocks), and with attention maps a MAP
        head's probe attention."""
        with torch.inference_mode():
            embedding = self.net.embed(tokens)
            probe = (
                self.net.pool(tokens, need_weights=True)[1] if maps is not None and self.config.pool == "map" else None
            )
        return Output(
            logits=logits.float() if logits is not None else None,
            embedding=embedding.float(),
            tokens=tokens.float(),
            attentions=None if maps is None else [None if a is None else a.float() for a in maps],
            probe_attention=probe.float() if probe is not None else None,
        )

    def pooled(self, out: Output, pool: str = "default") -> torch.Tensor:
        """(B, dim) float32 embedding of a forward's output for /v1/embed's `pool`:

        - `default`: the family's own embedding (`out.embedding`; ModelInfo "pool" and "embedding_dim");
        - `cls`: the final-normed class token (never projected); a ValueError for a model without one (SigLIP, gap);
        - `mean`: the mean of the patch tokens only (never class, distillation or register tokens), through the
          model's `fc_norm` where it has one (then the tokens themselves are not normed), else through the final norm.
        """
        if pool == "default":
            return out.embedding
        if pool == "cls":
            if not self.config.class_token:
                raise ValueError(
                    f"pool=cls: this {self.config.family} model has no class token (its own pooling is "
                    f"{self.config.pool!r}); use pool=default or pool=mean"
                )
            return out.tokens[:, 0]
        if pool == "mean":
            patches = out.tokens[:, self.config.num_prefix_tokens :].mean(dim=1)
            with torch.inference_mode():
                return self.net.fc_norm(patches.to(self.dtype)).float()
        raise ValueError(f"unknown pool {pool!r}; use one of {', '.join(POOLS)}")

    def attention_heatmap(
        self,
        out: Output,
        method: str = "rollout",
        layer: int = -1,
        head: int | None = None,
        rows: list[int] | None = None,
    ) -> tuple[torch.Tensor, str]:
        """(B, gh*gw) heatmap of /v1/attention's `method` (cls, rollout) for this model's token layout, and the
        method the response names (cls, rollout, probe, probe_rollout, mean, mean_rollout): see
        `analysis.attention_heatmap`. `out` comes from a forward with attentions=True; `rows` picks batch rows
        (all, without a copy, when None or every row in order)."""
        if out.attentions is None:
            raise ValueError("the forward was run without attentions=True")
        maps, probe = out.attentions, out.probe_attention
        B = out.tokens.shape[0]  # a MAP model's probe map reads no layer: every layer's map may be None
        if rows is not None and rows != list(range(B)):
            maps = [None if a is None else a[rows] for a in maps]
            probe = probe[rows] if probe is not None else None
        cfg = self.config
        return analysis.attention_heatmap(
            maps,  # type: ignore[arg-type]  # the layers read are computed
            method,
            prefix=cfg.num_prefix_tokens,
            pool="cls" if cfg.class_token else cfg.pool,
            probe=probe,
            layer=layer,
            head=head,
        )

    def attention_distance(self, out: Output, rows: list[int] | None = None) -> torch.Tensor:
        """(B, depth, heads) mean attention distance over the patch tokens (prefix tokens left out)."""
        assert out.attentions is not None
        maps = out.attentions if rows is None else [None if a is None else a[rows] for a in out.attentions]
        cfg = self.config
        return analysis.attention_distance(maps, tuple(cfg.grid), cfg.patch_size, cfg.num_prefix_tokens)  # type: ignore[arg-type]

    def position_similarity(self) -> np.ndarray:
        """(N, N) cosine similarity of the model's patch position embeddings, on the CPU (prefix slots left out)."""
        with torch.inference_mode():
            pos = self.net.pos_embed.detach()
            return analysis.position_similarity(pos, self.config.num_embedded_prefix).float().cpu().numpy()

    def device_error(self) -> str | None:
        """Why the device can no longer run anything, or None while it can. A CUDA error such as an illegal
        memory access or a device-side assert is sticky (every later call in this process fails as well), and
        only a new process gets a working device again; an out-of-memory error is not (None: smaller batches may
        well succeed)."""
        if self.device.type != "cuda":
            return None
        try:
            torch.ones(1, device=self.device).add_(1).cpu()  # the copy waits for the device: a sticky error shows
        except torch.cuda.OutOfMemoryError:  # even 4 bytes: the failed batch's tensors may still be held
            return None
        except Exception as e:  # torch.AcceleratorError (a RuntimeError before torch 2.8)
            return f"{type(e).__name__}: {' '.join(str(e).split())}"
        return None

    @property
    def embedding_dim(self) -> int:
        """The size of the default embedding: the projection's width for CLIP, else the token width."""
        cfg = self.config
        return cfg.num_classes if cfg.projection and cfg.num_classes > 0 else cfg.embed_dim

    @property
    def info(self) -> dict:
        cfg = self.config
        return {
            "source": self.source,
            "format": self.checkpoint_format,
            "sha256": self.sha256,
            "image_size": list(cfg.image_size),
            "patch_size": cfg.patch_size,
            "grid": list(cfg.grid),
            "embed_dim": cfg.embed_dim,
            "depth": cfg.depth,
            "num_heads": cfg.num_heads,
            "num_classes": self.num_classes,
            "family": cfg.family,
            "pool": {"cls_dist": "cls"}.get(cfg.pool, cfg.pool),
            "prefix_tokens": cfg.prefix_tokens,
            "embedding_dim": self.embedding_dim,
            "device": str(self.device),
            "dtype": "float8" if self.float8 else str(self.dtype).removeprefix("torch."),
            "preprocess": self.preprocess_config.to_dict(),
        }


def load_model(
    spec: str,
    arch: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    models_dir: str | Path | None = None,
) -> Model:
    """Load a checkpoint (see API.md for the SPEC forms) onto `device` in `dtype`.

    dtype: float32, bfloat16, float16, auto, or float8 (the blocks' linear layers in float8 e4m3, the rest in
    bfloat16: for GPUs with float8 tensor cores).
    The model is the plain `app/model/` network in eval mode; a runner (app.runner) makes it fast for serving.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dtype == "float8":
        if dev.type != "cuda":
            raise CheckpointError("--dtype float8 needs a CUDA GPU with float8 tensor cores (compute capability 8.9+)")
        if problem := float8_problem(dev):
            raise CheckpointError(f"--dtype float8: {problem}")
    ckpt = read_checkpoint(spec, arch=arch, models_dir=models_dir)
    net = build_model(ckpt, image_size)
    return Model(ckpt, net, dev, dt, float8=dtype == "float8")
