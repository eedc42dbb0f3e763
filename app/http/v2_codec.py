"""The Open Inference Protocol's wire format (KServe v2 / Triton REST): request parsing and response encoding.

Knows JSON tensors and Triton's binary-tensor extension, nothing about models:

- a request body is a JSON object, optionally followed by raw tensor bytes; the header
  `Inference-Header-Content-Length` then gives the JSON part's length, and each input that travels as
  bytes says how many with its `parameters.binary_data_size` (inputs take their bytes in order);
- numeric tensors are little-endian, row-major; a BYTES element is a 4-byte little-endian length and the
  bytes; in JSON a BYTES element is a base64 string (our images are binary, never UTF-8 text);
- a response puts the outputs asked for as binary (`binary_data` per output, or the request's
  `binary_data_output`) after its JSON part, in output order, and sets the same header.

Malformed requests raise `ApiError(422, "invalid_request")`, as for /v1 (API.md's table); the routes
in `app.http.v2` decide what the tensors mean. Counts are bounded from the declared shape before any data is
converted: at most MAX_DIMS dimensions, at most `max_items` rows (413 beyond), nesting no deeper than the shape.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import orjson

from app.http.envelope import ApiError, invalid
from app.http.pipeline import image_base64, too_large, too_many

HEADER_LENGTH = "Inference-Header-Content-Length"
NUMERIC = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}  # the numeric datatypes we take in
KNOWN = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
KNOWN |= {"FP16", "FP32", "FP64", "BF16", "BYTES"}
_LENGTH = struct.Struct("<I")
MAX_DIMS = 8  # the inputs taken have 1 to 4; numpy itself stops at 64
MAX_ELEMENTS = 1 << 40  # bound on a shape's product, zero dimensions left out (a [0, 2**40, 2**40] shape is no tensor)


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str  # "BYTES", "UINT8" or "FP32"
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]  # numeric: an array of `shape`; BYTES: the elements in row-major order


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: the request's `binary_data_output`
    classification: int  # 0: the tensor; k > 0: Triton's classification extension, top k as BYTES


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: the server's default outputs
    binary_output: bool  # the request parameter `binary_data_output`
    timeout_s: float | None = None  # the request parameter `timeout` (Triton's, in microseconds), in seconds


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str  # "FP32" or "BYTES"
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    binary: bool


# -- request ---------------------------------------------------------------------------------------------


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a request's `Content-Encoding` (gzip or deflate, as tritonclient sends), never past `limit` bytes."""
    kind = (encoding or "identity").strip().lower()
    if kind == "identity":
        return body
    if kind not in ("gzip", "deflate"):
        raise ApiError(415, "unsupported_media_type", f"unsupported Content-Encoding {kind!r}; use gzip or deflate")
    d = zlib.decompressobj(wbits=31 if kind == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise invalid(f"the {kind} request body cannot be decompressed: {e}") from None
    if len(out) > limit:
        raise too_large(limit)
    if not d.eof:
        raise invalid(f"the {kind} request body is truncated")
    return out


def json_part_length(body: bytes, header_length: str | None) -> int:
    """The length of the body's JSON part (all of it without the binary-tensor header; a bad header: all of it too,
    which `parse_request` then refuses)."""
    try:
        return min(len(body), int(header_length)) if header_length is not None else len(body)
    except ValueError:
        return len(body)


def parse_request(body: bytes, header_length: str | None, max_items: int | None = None) -> InferRequest:
    """A request body (already decompressed) -> its id, input tensors and requested outputs; 413 for an input of more
    than `max_items` rows (shape[0]), before its data is read."""
    json_part, binary = _split(body, header_length)
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as e:
        raise invalid(f"malformed JSON: {e}") from None
    if not isinstance(doc, dict):
        raise invalid('the request must be a JSON object {"inputs": [...]}')
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise invalid('"id" must be a string')
    parameters = _object(doc.get("parameters"), "parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise invalid('"inputs" must be a non-empty list of tensors')
    inputs = []
    offset = 0
    for i, raw in enumerate(raw_inputs):
        tensor, offset = _input(raw, i, binary, offset, max_items)
        inputs.append(tensor)
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes after the JSON part belong to no input (binary_data_size)")
    outputs = None
    if "outputs" in doc:
        raw_outputs = doc["outputs"]
        if not isinstance(raw_outputs, list):
            raise invalid('"outputs" must be a list of {"name": ...} objects')
        outputs = [_output(raw, i) for i, raw in enumerate(raw_outputs)]
    binary_output = _flag(parameters.get("binary_data_output", False), "parameters.binary_data_output")
    return InferRequest(request_id, inputs, outputs, binary_output, _timeout(parameters.get("timeout")))


def _timeout(value: object) -> float | None:
    """Triton's per-request `timeout` in microseconds -> seconds; absent or 0 (Triton: none) -> None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(f"parameters.timeout must be a whole number of microseconds >= 0, not {value!r}")
    return value / 1e6 if value else None


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise invalid(f"{HEADER_LENGTH} must be a number of bytes, not {header_length!r}") from None
    if not 0 <= n <= len(body):
        raise invalid(f"{HEADER_LENGTH} is {n}, but the body has {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


def _object(value: object, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f'"{where}" must be an object')
    return value


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(f'"{where}" must be true or false')
    return value


def _input(raw: object, i: int, binary: memoryview, offset: int, max_items: int | None) -> tuple[InputTensor, int]:
    where = f"inputs[{i}]"
    if not isinstance(raw, dict):
        raise invalid(f"{where} must be an object with name, datatype, shape and data")
    name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
    if not isinstance(name, str):
        raise invalid(f'{where}: "name" must be a string')
    where = f"input {name!r}"
    if not isinstance(datatype, str) or datatype not in KNOWN:
        raise invalid(f'{where}: "datatype" must be one of the protocol\'s datatypes, not {datatype!r}')
    if datatype not in NUMERIC and datatype != "BYTES":
        raise invalid(f"{where}: datatype {datatype} is not accepted; send BYTES (encoded images), UINT8 or FP32")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise invalid(f'{where}: "shape" must be a list of integers')
    if len(shape) > MAX_DIMS:
        raise invalid(f"{where}: shape has {len(shape)} dimensions; at most {MAX_DIMS} are taken")
    if any(d < 0 for d in shape):
        raise invalid(f"{where}: shape {shape} has a negative dimension")
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise invalid(f"{where}: shape {shape} is larger than any request can carry")
    if max_items is not None and shape and shape[0] > max_items:
        raise too_many(shape[0], max_items)
    count = math.prod(shape)
    params = _object(raw.get("parameters"), f"{where}.parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise invalid(f"{where}: binary_data_size must be a non-negative integer")
        if "data" in raw:
            raise invalid(f'{where} has both "data" and binary_data_size; send one')
        if offset + size > len(binary):
            raise invalid(f"{where}: binary_data_size {size} runs past the end of the body")
        chunk = binary[offset : offset + size]
        data = (
            _bytes_elements(chunk, count, where)
            if datatype == "BYTES"
            else _numeric_binary(chunk, datatype, count, where)
        )
        offset += size
    elif "data" in raw:
        data = (
            _bytes_json(raw["data"], len(shape), where)
            if datatype == "BYTES"
            else _numeric_json(raw["data"], datatype, where)
        )
    else:
        raise invalid(f'{where} has no "data" (and no binary_data_size)')
    n = len(data) if isinstance(data, list) else data.size
    if n != count:
        raise invalid(f"{where}: shape {shape} holds {count} elements, but {n} were sent")
    if isinstance(data, np.ndarray):
        data = data.reshape(shape)
    return InputTensor(name, datatype, tuple(shape), data), offset


def _numeric_binary(chunk: memoryview, datatype: str, count: int, where: str) -> np.ndarray:
    dtype = NUMERIC[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise invalid(f"{where}: {len(chunk)} bytes for {count} {datatype} elements ({dtype.itemsize} bytes each)")
    return np.frombuffer(chunk, dtype=dtype).astype(dtype.newbyteorder("="), copy=True)


def _numeric_json(data: object, datatype: str, where: str) -> np.ndarray:
    """JSON numbers (flat or nested lists) -> a flat array; UINT8 must be whole numbers in 0..255."""
    try:
        array = np.asarray(data)
    except ValueError:
        raise invalid(f'{where}: "data" is a ragged list') from None
    if array.size == 0:
        return np.zeros(0, NUMERIC[datatype])
    if array.dtype.kind not in "iuf" or array.dtype == object:
        raise invalid(f'{where}: "data" must hold numbers only')
    if datatype == "UINT8":
        if array.dtype.kind == "f" or array.min() < 0 or array.max() > 255:
            raise invalid(f"{where}: UINT8 data must be whole numbers from 0 to 255")
        return array.astype(np.uint8).ravel()
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, which the FP32 input check refuses
        return array.astype(np.float32).ravel()


def _bytes_elements(chunk: memoryview, count: int, where: str) -> list[bytes]:
    """Triton's serialised BYTES tensor: each element a 4-byte little-endian length, then its bytes; read no further
    than one element past the `count` that the shape declares (the caller refuses the mismatch)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(chunk) and len(out) <= count:
        if pos + 4 > len(chunk):
            raise invalid(f"{where}: a BYTES element's 4-byte length is cut off")
        (n,) = _LENGTH.unpack_from(chunk, pos)
        pos += 4
        if pos + n > len(chunk):
            raise invalid(f"{where}: a BYTES element says {n} bytes, but only {len(chunk) - pos} remain")
        out.append(bytes(chunk[pos : pos + n]))
        pos += n
    return out


def _bytes_json(data: object, ndim: int, where: str) -> list[bytes]:
    """JSON BYTES elements: base64 strings (or data: URLs), flat or nested at most `ndim` lists deep."""
    flat: list[object] = []
    stack = [(data, 0)]
    while stack:  # depth first, in order; a loop, so that no nesting can exhaust Python's stack
        item, depth = stack.pop()
        if not isinstance(item, list):
            flat.append(item)
        elif depth >= max(ndim, 1):
            raise invalid(f'{where}: "data" is nested deeper than its shape\'s {ndim} dimensions')
        else:
            stack.extend((x, depth + 1) for x in reversed(item))
    return [_b64(item, i, where) for i, item in enumerate(flat)]


def _b64(item: object, index: int, where: str) -> bytes:
    if isinstance(item, dict) and set(item) == {"b64"}:  # TensorFlow Serving's {"b64": ...} form
        item = item["b64"]
    if not isinstance(item, str):
        raise invalid(f"{where}: BYTES element {index} must be a base64 string, not {type(item).__name__}")
    return image_base64(item, index, where)


def _output(raw: object, i: int) -> RequestedOutput:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise invalid(f'outputs[{i}] must be an object with a "name" string')
    name = raw["name"]
    params = _object(raw.get("parameters"), f"outputs[{i}].parameters")
    binary = params.get("binary_data")
    if binary is not None:
        binary = _flag(binary, f"outputs[{i}].parameters.binary_data")
    k = params.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise invalid(f"output {name!r}: classification must be a non-negative integer (the number of classes)")
    return RequestedOutput(name, binary, k)


# -- response --------------------------------------------------------------------------------------------


def encode_response(header: dict, outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body and, when any output travels as bytes, the length of its JSON part."""
    described = []
    blobs = []
    for out in outputs:
        entry: dict = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if out.binary:
            blob = _serialise(out)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif out.datatype == "BYTES":
            entry["data"] = [b.decode("utf-8", "replace") for b in out.data]  # type: ignore[union-attr]
        else:
            entry["data"] = np.ascontiguousarray(out.data).ravel()
        described.append(entry)
    head = orjson.dumps({**header, "outputs": described}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _serialise(out: OutputTensor) -> bytes:
    if out.datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(b)) + b for b in out.data)  # type: ignore[union-attr]
    return np.ascontiguousarray(out.data, dtype="<f4").tobytes()
