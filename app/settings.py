"""The one settings object: every start-up option of API.md, from flags (see `app.__main__`) or `VIT_*` variables.

Each field's description is its flag's help.

Precedence is pydantic-settings' own: values passed to `Settings(...)` (the command line) win over the
environment, which wins over the defaults. The repeatable options (`model`, `arch`, `image_size`) are
kept as lists; `Settings.model_specs()` pairs them into one `ModelSpec` per model.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

KiB = 1 << 10
MiB = 1 << 20


def parse_list(value: Any) -> Any:
    """A `VIT_MODEL`-style value: a JSON list, or one plain value (which may itself look like JSON)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"not a valid JSON list: {e}") from None
        return [] if text == "" else [text]
    if value is None:
        return []
    if isinstance(value, (int, float)):
        return [value]
    return value


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container's
    `--cpus`, a pod's CPU limit), which `os.cpu_count()` and torch's default thread count both ignore."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


@dataclass(frozen=True)
class ModelSpec:
    """One `--model`: its SPEC (without the NAME= part), its explicit name, arch and image size."""

    spec: str
    name: str | None = None  # the NAME of NAME=SPEC; None: derived from the spec
    arch: str | None = None
    image_size: int | None = None


NAMED_SPEC = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)=(.+)$")


def split_name(text: str) -> tuple[str | None, str]:
    """`NAME=SPEC` -> (NAME, SPEC); a bare SPEC (a hub id, or an existing path holding "=") -> (None, SPEC)."""
    m = NAMED_SPEC.match(text)
    if m is None or text.startswith("hf-hub:") or Path(text).exists():
        return None, text
    return m.group(1), m.group(2)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIT_", extra="forbid", validate_default=True)

    # repeatable options: one value or a JSON list in the environment; pairing is done by model_specs()
    model: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="a checkpoint, NAME=SPEC to name it (repeatable; default: every model in the model repository)",
    )
    arch: Annotated[list[str | None], NoDecode] = Field(
        default_factory=list, description="architecture of the --model it follows (default: inferred)"
    )
    image_size: Annotated[list[int | None], NoDecode] = Field(
        default_factory=list,
        description="serve the --model it follows at N x N pixels; before any --model, every model (repeatable)",
    )

    models_dir: str | None = Field(
        None, description="the model repository (default ./models where it exists, else the bundled one)"
    )
    host: str = Field("127.0.0.1", description="address to listen on (default 127.0.0.1)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (default 8000)")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (default)")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float8"] = Field(
        "auto", description="float32, bfloat16, float16, float8 (GPUs with float8 tensor cores) or auto (default)"
    )
    max_batch_size: int | None = Field(
        None, ge=1, description="most images in one forward pass (default 32 on a GPU, 8 on the CPU)"
    )
    max_wait_ms: float = Field(5.0, ge=0, description="longest an image waits for its batch to fill (default 5)")
    max_queue: int = Field(256, ge=1, description="per model: most images accepted and not yet answered (default 256)")
    request_timeout_s: float = Field(
        30.0, gt=0, description="per request, from the moment its body is read (default 30)"
    )
    max_upload_bytes: int = Field(20 * MiB, ge=1, description="largest request body (default 20 MiB)")
    max_images_per_request: int = Field(64, ge=1, description="most images in one request (default 64)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest decoded width x height (default 40,000,000)")
    api_key: str | None = Field(None, description="when set, every /v1 request needs 'Authorization: Bearer <key>'")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug, info (default), warning or error"
    )

    # additions beyond the contract's table
    decode_workers: int = Field(
        default_factory=lambda: min(4, available_cpus()),
        ge=0,
        description="decoding processes or threads (default min(4, CPUs); 0: inline)",
    )
    # auto: threads on a machine with 2 CPUs or fewer (no pickling, no extra processes competing for the
    # cores; measured faster end to end by bench/decode_pool.py), a process pool above (out of the GIL)
    decode_pool: Literal["auto", "process", "thread"] = Field(
        "auto", description="auto (default: threads on <= 2 CPUs, else processes), process or thread"
    )
    jpeg_draft: bool = Field(
        True, description="true (default) or false: JPEG DCT scaling while the image stays >= 2x the resize target"
    )
    # torchvision decodes with the batch on the model's device: nvJPEG on a GPU
    jpeg_decoder: Literal["auto", "pil", "torchvision"] = Field(
        "auto",
        description="auto (default: torchvision on CUDA where installed), pil (exact) or torchvision (nvJPEG)",
    )
    warmup: bool = Field(True, description="true (default) or false: run every batch size once before ready")
    drain_timeout_s: float = Field(
        60.0, ge=0, description="after SIGTERM, longest wait for accepted requests (default 60)"
    )
    forward_timeout_s: float = Field(
        300.0, ge=0, description="a longer forward means a hung device: exit 1 (default 300; 0: off)"
    )
    compile: Literal["off", "auto"] = Field(  # the forward's speed-up (app.runner)
        "auto", description="auto (default: oneDNN linears on a CPU, CUDA graphs on a GPU) or off (the plain model)"
    )
    workers: int = Field(  # > 1: a supervisor and N server processes (app.process)
        1, ge=1, description="server processes on one socket, each with its own models (default 1)"
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="intra-op threads for the forward (default: OMP_NUM_THREADS, else the CPUs available, "
        "cgroup quota included, shared by the workers)",
    )
    # always 1 on a GPU (app.runner.CpuRunner)
    lanes: int | None = Field(
        None, ge=1, description="CPU forwards of one model at once, sharing --threads (default 2 with 2+ threads)"
    )
    max_decoded_bytes: int | None = Field(
        None,
        ge=1,
        description="largest decoded width x height x bytes per pixel, a 16-bit sample counting 2, read from the "
        "header (default 4 x max-image-pixels)",
    )
    max_jpeg_scans: int = Field(
        100, ge=1, description="a JPEG with more scans is refused before decoding (default 100; encoders write ~10)"
    )
    protect_docs: bool = Field(
        False, description="true or false (default): also put /metrics, /docs, /redoc, /openapi.json behind --api-key"
    )
    data_dir: str | None = Field(
        None,
        description="where the embedded PostgreSQL for collections lives (default: the user's data directory, "
        "~/.local/share/vitserve); started on the first use of a collections endpoint",
    )
    collections_url: str | None = Field(
        None,
        description="a shared PostgreSQL with pgvector (postgresql://...) for collections instead of the embedded one",
    )
    # slow and idle clients (app.http.pipeline.BodyReader, app.connections)
    body_timeout_s: float = Field(
        60.0, gt=0, description="the whole request body must arrive within it, else 408 (default 60)"
    )
    min_body_rate: float = Field(
        16 * KiB, ge=0, description="bytes/s a body must average after its first 5 s, else 408 (default 16 KiB)"
    )
    max_pending_body_bytes: int = Field(
        256 * MiB,
        ge=1,
        description="all request bodies being read at once, shared by the workers; beyond it 503 (default 256 MiB)",
    )
    max_connections: int = Field(
        1000, ge=1, description="open connections, shared by the workers; more are closed at once (default 1000)"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection's request headers must arrive within it, else it is closed (default 10)"
    )

    @field_validator("model", "arch", "image_size", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return parse_list(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        v = value.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"unknown device {value!r}; use cpu, cuda, cuda:N or auto")

    @field_validator("image_size")
    @classmethod
    def _sizes(cls, value: list[int | None]) -> list[int | None]:
        for size in value:
            if size is not None and size < 1:
                raise ValueError(f"image size {size} must be a positive number of pixels")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_queue < self.max_images_per_request:
            raise ValueError(
                f"max_queue ({self.max_queue}) is smaller than max_images_per_request "
                f"({self.max_images_per_request}): a full-size request could never be accepted; "
                "raise --max-queue or lower --max-images-per-request"
            )
        self.model_specs()  # the pairing must make sense
        return self

    def model_specs(self) -> list[ModelSpec]:
        """One ModelSpec per `model`, with its arch and image size paired by position.

        An `arch` or `image_size` list pairs one to one with the models; a single `image_size`
        applies to every model (also to the repository's models when no `model` is given).
        """
        n = len(self.model)
        if len(self.arch) not in (0, n) and not (n == 0 and not any(self.arch)):
            raise ValueError(
                f"{len(self.arch)} arch value(s) for {n} model(s): give one --arch after each --model it "
                "describes (or a JSON list with one entry per model, null where it is inferred)"
            )
        if len(self.image_size) > 1 and len(self.image_size) != n:
            raise ValueError(
                f"{len(self.image_size)} image sizes for {n} model(s): give one size for all, or one per model"
            )
        arches = self.arch or [None] * n
        sizes = self.image_size if len(self.image_size) == n else [self.global_image_size] * n
        specs = []
        for text, arch, size in zip(self.model, arches, sizes, strict=True):
            name, spec = split_name(text)
            specs.append(ModelSpec(spec=spec, name=name, arch=arch or None, image_size=size))
        return specs

    @property
    def global_image_size(self) -> int | None:
        """The image size that applies to every model (a single value), else None."""
        return self.image_size[0] if len(self.image_size) == 1 else None

    @property
    def decoded_bytes_limit(self) -> int:
        """--max-decoded-bytes, or its default: 4 bytes (RGBA) for each of --max-image-pixels."""
        return self.max_decoded_bytes if self.max_decoded_bytes is not None else 4 * self.max_image_pixels

    @property
    def decode_pool_kind(self) -> Literal["process", "thread"]:
        if self.decode_pool != "auto":
            return self.decode_pool
        return "process" if available_cpus() > 2 else "thread"

    @property
    def forward_threads(self) -> int:
        """The forward's intra-op threads: --threads, else OMP_NUM_THREADS, else this process's share of the CPUs
        (the available CPUs divided among --workers)."""
        if self.threads is not None:
            return self.threads
        if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
            return int(os.environ["OMP_NUM_THREADS"])
        return max(1, available_cpus() // self.workers)

    def batch_size_for(self, device_type: str) -> int:
        """--max-batch-size, or its default for the device: 32 on a GPU, 8 on the CPU."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        return 32 if device_type == "cuda" else 8
