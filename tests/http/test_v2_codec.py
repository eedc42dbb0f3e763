"""The Open Inference Protocol's codec on its own: every malformed request is refused with the protocol's own
status and a message that names what is wrong (the HTTP tests in test_v2.py cover the well-formed ones)."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest

from app.http.envelope import ApiError
from app.http.v2_codec import decompress, parse_request


def tensor(**fields) -> dict:
    return {"name": "x", "datatype": "UINT8", "shape": [1, 2], "data": [1, 2], **fields}


def body(inputs: list, **fields) -> bytes:
    return json.dumps({"inputs": inputs, **fields}).encode()


def refused(call, status: int, words: str) -> None:
    with pytest.raises(ApiError) as raised:
        call()
    assert raised.value.status == status, raised.value.message
    assert words in raised.value.message, raised.value.message


MALFORMED = {
    "not an object": (b"[1, 2]", None, "must be a JSON object"),
    "id not a string": (body([tensor()], id=7), None, '"id" must be a string'),
    "parameters not an object": (body([tensor()], parameters=[1]), None, '"parameters" must be an object'),
    "no inputs": (body([]), None, "non-empty list"),
    "input not an object": (body([3]), None, "inputs[0] must be an object"),
    "name not a string": (body([tensor(name=1)]), None, '"name" must be a string'),
    "unknown datatype": (body([tensor(datatype="FP128")]), None, "protocol's datatypes"),
    "datatype not taken": (body([tensor(datatype="INT32")]), None, "INT32 is not accepted"),
    "shape not integers": (body([tensor(shape=[1, "2"])]), None, '"shape" must be a list of integers'),
    "shape a bool": (body([tensor(shape=[True, 2])]), None, '"shape" must be a list of integers'),
    "negative dimension": (body([tensor(shape=[1, -2])]), None, "negative dimension"),
    "no data": (body([{"name": "x", "datatype": "UINT8", "shape": [1]}]), None, 'no "data"'),
    "ragged data": (body([tensor(data=[[1, 2], [3]])]), None, "ragged"),
    "strings as numbers": (body([tensor(data=["a", "b"])]), None, "numbers only"),
    "UINT8 out of range": (body([tensor(data=[1, 256])]), None, "0 to 255"),
    "UINT8 fractions": (body([tensor(data=[1, 2.5])]), None, "0 to 255"),
    "count mismatch": (body([tensor(shape=[1, 3])]), None, "holds 3 elements, but 2"),
    "BYTES not base64 strings": (body([tensor(datatype="BYTES", shape=[1], data=[5])]), None, "base64 string"),
    "outputs not a list": (body([tensor()], outputs={"name": "x"}), None, '"outputs" must be a list'),
    "output without a name": (body([tensor()], outputs=[{"nom": "x"}]), None, "outputs[0] must be an object"),
    "output classification": (
        body([tensor()], outputs=[{"name": "x", "parameters": {"classification": -1}}]),
        None,
        "non-negative integer",
    ),
    "output binary_data not a flag": (
        body([tensor()], outputs=[{"name": "x", "parameters": {"binary_data": "yes"}}]),
        None,
        "must be true or false",
    ),
    "binary_data_output not a flag": (
        body([tensor()], parameters={"binary_data_output": 1}),
        None,
        "must be true or false",
    ),
    "timeout not microseconds": (body([tensor()], parameters={"timeout": 1.5}), None, "whole number of microseconds"),
    "header length not a number": (body([tensor()]), "ten", "must be a number of bytes"),
    "header length past the body": (body([tensor()]), "100000", "but the body has"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_requests_are_422_naming_the_problem(case):
    raw, header_length, words = MALFORMED[case]
    refused(lambda: parse_request(raw, header_length), 422, words)


def binary_request(inputs: list, blob: bytes) -> tuple[bytes, str]:
    head = body(inputs)
    return head + blob, str(len(head))


def sized(datatype: str, shape: list, size: object, **fields) -> dict:
    """An input whose data follows the JSON part: `size` bytes of it (binary_data_size)."""
    return {"name": "x", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}, **fields}


BINARY = {
    "size not an integer": ([sized("UINT8", [2], "2")], b"\x01\x02", "non-negative integer"),
    "both data and size": ([sized("UINT8", [2], 2, data=[1, 2])], b"\x01\x02", 'both "data"'),
    "size past the end": ([sized("UINT8", [9], 9)], b"\x01", "runs past"),
    "bytes for the wrong count": ([sized("FP32", [2], 4)], b"\x00" * 4, "4 bytes for 2 FP32 elements"),
    "BYTES length cut off": ([sized("BYTES", [1], 2)], b"\x01\x00", "4-byte length is cut off"),
    "BYTES element too long": ([sized("BYTES", [1], 6)], b"\x09\x00\x00\x00ab", "says 9 bytes, but only 2 remain"),
    "bytes left over": ([sized("UINT8", [2], 2)], b"\x01\x02\x03", "1 bytes after the JSON part belong to no input"),
}


@pytest.mark.parametrize("case", BINARY)
def test_malformed_binary_data_is_422(case):
    inputs, blob, words = BINARY[case]
    raw, header_length = binary_request(inputs, blob)
    refused(lambda: parse_request(raw, header_length), 422, words)


def test_well_formed_binary_and_json_inputs_parse():
    pixels = np.arange(6, dtype=np.uint8)
    raw, header_length = binary_request(
        [sized("UINT8", [1, 6], 6, name="a"), tensor(name="b")],
        pixels.tobytes(),
    )
    request = parse_request(raw, header_length)
    assert [t.name for t in request.inputs] == ["a", "b"]
    np.testing.assert_array_equal(request.inputs[0].data, pixels.reshape(1, 6))
    np.testing.assert_array_equal(request.inputs[1].data, [[1, 2]])


def test_compressed_bodies_are_bounded_and_checked():
    raw = b'{"inputs": []}' * 10
    assert decompress(gzip.compress(raw), "gzip", 1000) == raw
    assert decompress(zlib.compress(raw), " Deflate ", 1000) == raw
    assert decompress(raw, None, 10) == raw  # identity: the HTTP layer bounds the body itself
    refused(lambda: decompress(raw, "br", 1000), 415, "use gzip or deflate")
    refused(lambda: decompress(gzip.compress(raw)[:-12], "gzip", 1000), 422, "truncated")
    refused(lambda: decompress(b"not gzip at all", "gzip", 1000), 422, "cannot be decompressed")
    with pytest.raises(ApiError) as raised:
        decompress(gzip.compress(raw), "gzip", 50)
    assert raised.value.status == 413
