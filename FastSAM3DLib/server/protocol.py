"""The FastSAM3D server protocol: endpoints, headers, error codes and the binary frame (numpy + stdlib only).

Endpoints (all under ``/v1``; every request but ``/healthz`` carries ``X-FastSAM3D-Protocol: 1`` and, when the
server has a token, ``Authorization: Bearer <token>``):

* ``GET /healthz`` -- ``ok`` (for load balancers; no auth).
* ``GET /v1/info`` -- JSON: protocol, server version, models with their geometry, limits.
* ``POST /v1/sessions`` -- JSON ``{"model": name}`` -> 201 JSON ``{"session": id, "model": {...}, "limits": {...}}``.
* ``POST /v1/sessions/<id>/click`` -- a frame (below) -> a frame. Header: ``model``, ``embedding`` (a key the
  client chose for the region), ``steps`` (``[{"points": [[x, y, z], ...], "labels": [1, 0, ...]}, ...]``:
  model-space points, one decoder run per step, each fed the logits of the one before), ``previous`` (the
  ``logits_id`` of a former reply, or null for zeros). Optional arrays: ``image`` (the float32 128^3 model input
  of that region, when the server lacks it) and ``previous_logits`` (float32 32^3, when the server lacks them).
  Reply header: ``logits_id``, ``iou``, ``encoded``, ``timings``; array ``logits`` (float32 32^3).
* ``DELETE /v1/sessions/<id>`` -- 204.

Errors are JSON ``{"error": code, "message": text}`` with the HTTP status of :data:`ERROR_STATUS`. A 409
``missing`` lists what the server lacks (``"image"``, ``"previous_logits"``): the client resends with it.

Frame: ``b"FS3D"``, a big-endian uint32 header length, the UTF-8 JSON header, then the array bytes. The header's
``arrays`` maps a name to ``{"dtype", "shape", "codec", "offset", "length"}``; codec ``zlib`` (the client's for
``image``: regions padded with zeros compress best so), ``shuffle-zlib`` (zlib of the bytes regrouped by byte
position: float logits compress better so) or ``raw``; all lossless. Nothing is ever pickled, and
decoding checks every array against the dtype and shape the reader expects before inflating it.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

PROTOCOL_VERSION = 1
PROTOCOL_HEADER = "X-FastSAM3D-Protocol"
#: Ray Serve routes requests carrying this header to the replica that holds this "model": here, the session.
SESSION_HEADER = "serve_multiplexed_model_id"
REPLICA_HEADER = "X-FastSAM3D-Replica"
FRAME_TYPE = "application/vnd.fastsam3d.frame"
MAGIC = b"FS3D"
MAX_HEADER_BYTES = 256 * 1024
CODECS = ("shuffle-zlib", "zlib", "raw")

#: error code -> HTTP status
ERROR_STATUS = {
    "malformed": 400, "protocol": 400, "prompt": 422, "input_image": 422, "unauthorized": 401,
    "not_found": 404, "session_unknown": 404, "too_slow": 408, "missing": 409, "too_large": 413, "rate_limited": 429,
    "model_output": 422, "model_unavailable": 422, "out_of_memory": 503, "full": 503, "internal": 500,
}


class FrameError(ValueError):
    """A frame is malformed (bad magic, header, array spec, size or compressed stream)."""


def frame_header(body: bytes, max_header: int = MAX_HEADER_BYTES) -> bytes:
    """The JSON header bytes of a frame (FrameError for a body that is no frame or a header over ``max_header``)."""
    if len(body) < 8 or body[:4] != MAGIC:
        raise FrameError("the body is not a FastSAM3D frame (bad magic)")
    (length,) = struct.unpack(">I", body[4:8])
    if 8 + length > len(body):
        raise FrameError(f"the frame header length {length} is longer than the body")
    if length > max_header:
        raise FrameError(f"the frame header is {length} bytes, over this reader's limit of {max_header}: send "
                         "fewer decoder steps or points per request")
    return body[8:8 + length]


def _shuffle(raw: bytes, itemsize: int) -> bytes:
    if itemsize == 1:
        return raw
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(raw: bytes, itemsize: int) -> bytes:
    if itemsize == 1:
        return raw
    return np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()


def pack(header: Mapping, arrays: Optional[Mapping[str, np.ndarray]] = None, level: int = 1,
         codec: str = "shuffle-zlib", codecs: Optional[Mapping[str, str]] = None) -> bytes:
    """One frame: ``header`` (JSON-able) plus ``arrays`` (little-endian, compressed with ``codec``, or per name
    with ``codecs``: plain zlib suits a model input padded with zeros, shuffle-zlib the logits)."""
    specs, blobs, offset = {}, [], 0
    for name, array in (arrays or {}).items():
        codec_here = (codecs or {}).get(name, codec)
        array = np.ascontiguousarray(array)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        raw = array.tobytes()
        if codec_here == "shuffle-zlib":
            data = zlib.compress(_shuffle(raw, array.itemsize), level)
        elif codec_here == "zlib":
            data = zlib.compress(raw, level)
        elif codec_here == "raw":
            data = raw
        else:
            raise ValueError(f"unknown codec {codec_here!r}; choose one of {CODECS}")
        specs[name] = {"dtype": array.dtype.name, "shape": list(array.shape), "codec": codec_here, "offset": offset,
                       "length": len(data)}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(dict(header, arrays=specs), allow_nan=False, separators=(",", ":")).encode("utf-8")
    return b"".join([MAGIC, struct.pack(">I", len(text)), text] + blobs)


def _no_constants(name):
    raise FrameError(f"the header holds {name}, which is not a number this protocol accepts")


def loads_json(data: bytes) -> dict:
    """A JSON object from ``data`` (NaN and Infinity refused); FrameError otherwise."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an integer past Python's digit limit
        raise FrameError(f"the JSON is malformed ({exc})") from None
    if not isinstance(value, dict):
        raise FrameError("the JSON body must be an object")
    return value


def unpack(body: bytes, expected: Mapping[str, Tuple[str, Tuple[int, ...]]],
           max_header: int = MAX_HEADER_BYTES) -> Tuple[dict, Dict[str, np.ndarray]]:
    """``(header, arrays)`` of a frame. ``expected``: name -> (dtype, shape) of each array the reader accepts
    (others are refused); every array is checked against it before any byte is inflated. ``max_header``: the
    longest JSON header accepted (bytes)."""
    header_bytes = frame_header(body, max_header)
    header = loads_json(header_bytes)
    specs = header.pop("arrays", {})
    if not isinstance(specs, dict):
        raise FrameError("the frame's 'arrays' must be an object")
    payload = memoryview(body)[8 + len(header_bytes):]
    arrays = {}
    for name, spec in specs.items():
        if name not in expected:
            raise FrameError(f"unexpected array {name!r} (this request takes {sorted(expected) or 'none'})")
        arrays[name] = _array(name, spec, payload, *expected[name])
    return header, arrays


def _array(name: str, spec, payload: memoryview, dtype: str, shape: Tuple[int, ...]) -> np.ndarray:
    if not isinstance(spec, dict):
        raise FrameError(f"array {name!r}: its description must be an object")
    if spec.get("dtype") != dtype or spec.get("shape") != list(shape):
        raise FrameError(f"array {name!r} must be {dtype} of shape {list(shape)}, got {spec.get('dtype')} of shape "
                         f"{spec.get('shape')}")
    codec, offset, length = spec.get("codec"), spec.get("offset"), spec.get("length")
    if codec not in CODECS:
        raise FrameError(f"array {name!r}: unknown codec {codec!r}")
    if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset and 0 <= length
            and offset + length <= len(payload)):
        raise FrameError(f"array {name!r}: offset/length outside the frame")
    item = np.dtype(dtype).itemsize
    size = int(math.prod(shape)) * item
    data = bytes(payload[offset:offset + length])
    if codec != "raw":
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(data, size)  # never inflates past the expected size
        except zlib.error as exc:
            raise FrameError(f"array {name!r}: the compressed data are damaged ({exc})") from None
        if len(raw) != size or inflater.unconsumed_tail or not inflater.eof:
            raise FrameError(f"array {name!r}: the compressed data do not hold exactly {size} bytes")
        if codec == "shuffle-zlib":
            raw = _unshuffle(raw, item)
    else:
        raw = data
        if len(raw) != size:
            raise FrameError(f"array {name!r}: {len(raw)} bytes instead of {size}")
    array = np.frombuffer(bytearray(raw), dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return array.astype(dtype, copy=False)  # writable, native byte order


def token_is_sendable(token: str) -> bool:
    """True when ``token`` is printable ASCII without spaces, which every HTTP client and proxy sends unchanged."""
    return all("!" <= c <= "~" for c in token)


def error_body(code: str, message: str, **extra) -> bytes:
    """The JSON body of an error reply."""
    return json.dumps(dict(extra, error=code, message=message, protocol=PROTOCOL_VERSION)).encode("utf-8")
