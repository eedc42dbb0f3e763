"""What /docs, /redoc and /openapi.json say about each route: its request body, its 200 answer (schema and
example) and every error status it can answer with, in the error envelope of its path.

The routes write their answers with `FastJSON`; the models here only document them (the routes keep
`response_model=None`), so they allow fields beyond the ones named.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- errors ---------------------------------------------------------------------------------------------


class ErrorDetail(Doc):
    code: str = Field(description="what went wrong, for a program to switch on (the table below)")
    message: str = Field(description="what to change, for a person; at most 500 characters")
    index: int | None = Field(None, description="invalid_image, image_too_large: the image's position in the request")
    filename: str | None = Field(None, description="invalid_image, image_too_large: the upload's file name, if any")


class ErrorBody(Doc):
    """Every error outside /v2."""

    error: ErrorDetail


class V2ErrorBody(Doc):
    """Every error under /v2: the Open Inference Protocol's shape."""

    error: str = Field(description="what went wrong and what to change")


# status -> (code, when, example message)
ERRORS: dict[int, tuple[str, str, str]] = {
    400: (
        "invalid_image",
        "an image that cannot be decoded or used (invalid_image), or over --max-image-pixels (image_too_large)",
        "image 0 (notes.txt): unsupported or unrecognised image format; send JPEG, PNG, WebP, GIF, BMP or TIFF",
    ),
    401: ("unauthorized", "the server has an API key and the request's Bearer token is missing or wrong",
          "missing or wrong API key: send 'Authorization: Bearer <key>'"),
    404: ("model_not_found", "no loaded model of that name", "no model named 'resnet'; loaded models: mnist-vit"),
    409: ("conflict", "a collection or item id that exists already; a collection whose model is not loaded or "
          "changed", "collection 'digits' already holds item id(s) 'seven'; nothing was added"),
    413: ("payload_too_large", "a body over --max-upload-bytes, or more images than --max-images-per-request",
          "65 images in one request; at most 64 are allowed"),
    415: ("unsupported_media_type", "a body that is not multipart/form-data, JSON or an image",
          "unsupported Content-Type 'text/plain': send multipart/form-data with 'images' files, application/json "
          "with base64 'images', or the image itself as image/* or application/octet-stream"),
    422: ("invalid_request", "a parameter out of its range, a malformed body, no images, format=png with several",
          "top_k must be between 1 and 10 (the model's number of classes), not 11"),
    500: ("internal_error", "a fault of the server, never of the input",
          "internal server error; quote request id 6f1c2b0e9d8a4c57 when reporting it"),
    503: ("not_ready", "loading, draining after SIGTERM or device lost (not_ready); queue full (overloaded, with "
          "Retry-After)", "models are still loading (0 of 1 ready); retry shortly"),
    504: ("timeout", "longer than --request-timeout-s",
          "the request took longer than the 30 s limit; its unfinished work was dropped"),
}  # fmt: skip


def errors(*statuses: int, v2: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these error statuses, with the envelope and an example each."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        code, when, message = ERRORS[status]
        example: dict = {"error": message} if v2 else {"error": {"code": code, "message": message}}
        model = V2ErrorBody if v2 else ErrorBody
        out[status] = {
            "model": model,  # registers the schema; errors are JSON whatever the route's own media type
            "description": f"`{code}`: {when}",
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}, "example": example}
            },
        }
    return out


def ok(model: type[BaseModel], example: Any, description: str = "OK", png: str | None = None) -> dict[int, dict]:
    """The 200 entry: a documentation model and an example (and, with `png`, an image/png alternative)."""
    content: dict[str, Any] = {"application/json": {"example": example}}
    if png:
        content["image/png"] = {"schema": {"type": "string", "format": "binary"}}
        description = f"{description}; with format=png: {png}"
    return {200: {"model": model, "description": description, "content": content}}


# /v1 routes run these checks before their own (app.http.checks.CheckedRoute)
V1_CHECKS = (401, 500, 503)
V1_IMAGES = (*V1_CHECKS, 400, 404, 413, 415, 422, 504)  # the routes that take images


# -- request bodies ------------------------------------------------------------------------------------

_BINARY = {"type": "string", "format": "binary"}
IMAGES_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "one or more images (JPEG, PNG, WebP, GIF, BMP, TIFF) in one of three forms; results "
        "come back in request order",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": _BINARY, "description": "one part per image"}},
                    "required": ["images"],
                },
            },
            "image/png": {"schema": _BINARY},
            "image/jpeg": {"schema": _BINARY},
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "byte"}, "minItems": 1}
                    },
                    "required": ["images"],
                },
                "example": {"images": ["iVBORw0KGgoAAAANSUhEUgAA..."]},
            },
        },
    }
}

_TENSOR = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "example": "images"},
        "datatype": {"type": "string", "enum": ["BYTES", "UINT8", "FP32"]},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {"type": "array", "items": {}, "description": "row-major; BYTES: base64 strings of encoded images"},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
    },
    "required": ["name", "datatype", "shape"],
}
V2_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "one input tensor: BYTES [N] encoded images, UINT8 [N, H, W, 3] RGB pixels or FP32 "
        "[N, 3, H, W] preprocessed pixels. With the binary extension the JSON part is followed by the tensors' "
        "bytes (Inference-Header-Content-Length gives the JSON part's length); gzip or deflate bodies are read",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "name": {
                                        "type": "string",
                                        "enum": ["probabilities", "logits", "embedding", "attention_rollout"],
                                    },
                                    "parameters": {
                                        "type": "object",
                                        "properties": {
                                            "classification": {"type": "integer"},
                                            "binary_data": {"type": "boolean"},
                                        },
                                    },
                                },
                                "required": ["name"],
                            },
                        },
                        "parameters": {
                            "type": "object",
                            "properties": {"binary_data_output": {"type": "boolean"}, "timeout": {"type": "integer"}},
                        },
                    },
                    "required": ["inputs"],
                },
                "example": {
                    "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["iVBORw0KGgo..."]}],
                    "outputs": [{"name": "probabilities"}],
                },
            },
            "application/octet-stream": {"schema": _BINARY},
        },
    }
}


# -- answers --------------------------------------------------------------------------------------------


class Health(Doc):
    status: str


class Ready(Doc):
    status: str
    models: list[str] = Field(description="the loaded models, the default first")


class Preprocess(Doc):
    resize: list[int] | None
    crop: list[int] | None
    interpolation: str
    mean: list[float]
    std: list[float]
    grayscale: bool


class Serving(Doc):
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    lanes: int
    fast_path: str | None


class ModelInfo(Doc):
    name: str
    source: str = Field(description="the SPEC as the operator gave it, or the folder name of a repository model")
    format: str
    sha256: str
    image_size: list[int]
    patch_size: int
    grid: list[int]
    embed_dim: int
    depth: int
    num_heads: int
    num_classes: int
    device: str
    dtype: str
    preprocess: Preprocess
    serving: Serving


MODEL_INFO = {
    "name": "mnist-vit",
    "source": "mnist-vit",
    "format": "native",
    "sha256": "11d79907f6199a6464dc38c61c972c330b8ed2fddcfb55f154487f9cbc81e20b",
    "image_size": [28, 28],
    "patch_size": 4,
    "grid": [7, 7],
    "embed_dim": 128,
    "depth": 6,
    "num_heads": 4,
    "num_classes": 10,
    "device": "cpu",
    "dtype": "float32",
    "preprocess": {
        "resize": [28, 28],
        "crop": None,
        "interpolation": "bilinear",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "grayscale": True,
    },
    "serving": {"max_batch_size": 8, "max_wait_ms": 5.0, "max_queue": 256, "lanes": 2, "fast_path": "onednn"},
}


class ModelList(Doc):
    models: list[ModelInfo]


class Prediction(Doc):
    index: int
    label: str
    score: float = Field(description="softmax probability")


class ClassifyResult(Doc):
    filename: str | None = Field(description="the multipart part's file name; null for a raw or JSON body")
    predictions: list[Prediction]


class ClassifyResponse(Doc):
    model: str
    results: list[ClassifyResult]


class EmbedResult(Doc):
    filename: str | None
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 (encoding=base64)")


class EmbedResponse(Doc):
    model: str
    dim: int
    results: list[EmbedResult]


class AttentionResult(Doc):
    filename: str | None
    method: str
    grid: list[int]
    heatmap: list[list[float]] = Field(description="grid rows x columns, summing to 1")
    region: list[float] = Field(description="(left, top, right, bottom) of the upload, in its pixels, the map covers")


class AttentionResponse(Doc):
    model: str
    results: list[AttentionResult]


class DistanceResult(Doc):
    filename: str | None
    distance: list[list[float]] = Field(description="layers x heads, mean attention distance in pixels")


class DistanceResponse(Doc):
    model: str
    results: list[DistanceResult]


class SimilarityResponse(Doc):
    model: str
    grid: list[int]
    similarity: list[list[float]] = Field(description="patches x patches cosine similarity of position embeddings")


class V2ServerMetadata(Doc):
    name: str
    version: str
    extensions: list[str]


class V2Live(Doc):
    live: bool


class V2Ready(Doc):
    ready: bool


class V2TensorMetadata(Doc):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(Doc):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ModelReady(Doc):
    name: str
    ready: bool


class V2OutputTensor(Doc):
    name: str
    datatype: str
    shape: list[int]
    data: list[float | str] | None = None
    parameters: dict[str, Any] | None = None


class V2InferResponse(Doc):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2OutputTensor]


PREDICTIONS = [
    {"index": 7, "label": "7", "score": 0.9176},
    {"index": 9, "label": "9", "score": 0.0237},
    {"index": 2, "label": "2", "score": 0.0129},
]
EXAMPLES: dict[str, Any] = {
    "classify": {"model": "mnist-vit", "results": [{"filename": "digit-7.png", "predictions": PREDICTIONS}]},
    "embed": {
        "model": "mnist-vit",
        "dim": 128,
        "results": [{"filename": "digit-7.png", "embedding": [-0.1761, -0.0251, 0.0091]}],
    },
    "attention": {
        "model": "mnist-vit",
        "results": [
            {
                "filename": "drawn-4.png",
                "method": "cls",
                "grid": [7, 7],
                "heatmap": [[0.0084, 0.0183], [0.0163, 0.0243]],
                "region": [0.0, 0.0, 280.0, 280.0],
            }
        ],
    },
    "distance": {
        "model": "mnist-vit",
        "results": [{"filename": "digit-7.png", "distance": [[14.413, 13.6235, 14.8394, 12.5995]]}],
    },
    "similarity": {"model": "mnist-vit", "grid": [7, 7], "similarity": [[1.0, 0.7574], [0.7574, 1.0]]},
    "v2_metadata": {
        "name": "mnist-vit",
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    },
    "v2_infer": {
        "model_name": "mnist-vit",
        "model_version": "1",
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": [0.0079, 0.0109]}],
    },
}
