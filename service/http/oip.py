"""The Open Inference Protocol (KServe v2) over HTTP/REST, as Triton speaks it, incl. binary tensors.

A second face of the same data plane: this module only parses tensors and shapes answers.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import reprlib
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..dataplane import DATATYPES, Tensor, classification_strings
from ..errors import BadTensor, Unavailable
from ..tasks import get as get_task
from .common import dataplane, deadline, read_body

router = APIRouter(tags=["open inference protocol"])

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_RANK = 8


@router.get("/v2", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return dataplane(request).server_metadata()


@router.get("/v2/health/live", summary="Liveness: the process answers")
async def live() -> dict[str, Any]:
    return {"live": True}


@router.get("/v2/health/ready", summary="Readiness: the first load is over and a model serves (strict: every model)")
async def ready(request: Request) -> Any:
    if request.app.state.draining:
        raise Unavailable("the server is shutting down", retry_after_s=1)
    reason = dataplane(request).registry.not_ready_reason()
    if reason is not None:
        raise Unavailable(reason, retry_after_s=2)
    return {"ready": True}


@router.get("/v2/models/{model}", summary="Model metadata")
@router.get("/v2/models/{model}/versions/{version}", include_in_schema=False)
async def model_metadata(request: Request, model: str, version: str | None = None) -> dict[str, Any]:
    dp = dataplane(request)
    return dp.metadata(model, version)  # an UNAVAILABLE model's metadata says why


@router.get("/v2/models/{model}/ready", summary="Model readiness")
@router.get("/v2/models/{model}/versions/{version}/ready", include_in_schema=False)
async def model_ready(request: Request, model: str, version: str | None = None) -> dict[str, Any]:
    dp = dataplane(request)
    m = dp.model(model, version)
    if not m.ready:
        raise Unavailable(f"model {model} is not ready", retry_after_s=2)
    return {"name": m.name, "ready": True}


@router.get("/v2/models/{model}/config", summary="Triton-style model configuration")
@router.get("/v2/models/{model}/versions/{version}/config", include_in_schema=False)
async def model_config(request: Request, model: str, version: str | None = None) -> dict[str, Any]:
    dp = dataplane(request)
    return dp.model_config(dp.model(model, version))


@router.post("/v2/models/{model}/infer", summary="Inference with JSON or binary tensors")
@router.post("/v2/models/{model}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request, model: str, version: str | None = None) -> Response:
    dp = dataplane(request)
    m = dp.model(model, version)
    due = deadline(request)
    async with dp.track(m, "infer"):
        body = await read_body(request, dp.settings.max_body_bytes)
        header, binary = _split(body, request.headers.get(HEADER_LENGTH))
        req = _json(header)
        inputs = _inputs(req, binary, dp.settings.max_body_bytes)
        wanted = _requested(req, m.runners[0].output_names)  # refuse a bad request before running it
        names, outputs = await dp.infer(m, inputs, due)
        return _response(req, wanted, m, names, outputs)


# -- request parsing -------------------------------------------------------------------------------------
def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise BadTensor(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 < n <= len(body):
        raise BadTensor(f"{HEADER_LENGTH} {n} does not fit a body of {len(body)} bytes")
    return body[:n], body[n:]


def _json(header: bytes) -> dict[str, Any]:
    try:
        req = json.loads(header)
    except RecursionError:  # a depth bomb: json's C parser counts its depth and stops cleanly
        raise BadTensor("request JSON is nested too deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadTensor(f"request is not valid JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise BadTensor("request must be a JSON object with a non-empty 'inputs' list")
    if "id" in req and not isinstance(req["id"], str):
        raise BadTensor("'id' must be a string")
    return req


def _inputs(req: dict[str, Any], binary: bytes, budget: int) -> list[Tensor]:
    """The request's tensors, each checked against its shape; ``budget`` bounds any tensor's element count
    (no element takes less than a byte of the body, so nothing honest is larger than the body limit)."""
    tensors, offset = [], 0
    for i, raw in enumerate(req["inputs"]):
        if not isinstance(raw, dict):
            raise BadTensor(f"inputs[{i}] must be an object")
        name, dtype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
        if not isinstance(name, str) or not isinstance(dtype, str):
            raise BadTensor(f"inputs[{i}] needs a string 'name' and 'datatype'")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise BadTensor(f"input {name!r}: 'shape' must be a list of at most {MAX_RANK} non-negative integers")
        count = math.prod(shape)  # exact: a numpy product of [2**62, 4] would wrap around
        if count > budget or max(shape, default=0) > budget:  # [0, 2**62] holds nothing but cannot be made
            raise BadTensor(f"input {name!r}: shape {shape} holds {count} elements; the body limit allows "
                            f"at most {budget}")
        params = raw.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadTensor(f"input {name!r}: binary_data_size {size} does not fit the binary part")
            chunk = binary[offset:offset + size]
            offset += size
            data: np.ndarray | list[bytes] = _from_binary(name, dtype, chunk, count)
        else:
            if "data" not in raw:
                raise BadTensor(f"input {name!r} has neither 'data' nor binary_data_size")
            data = _from_json(name, dtype, raw["data"], count)
        if isinstance(data, np.ndarray):
            data = data.reshape(shape)
        tensors.append(Tensor(name, dtype, shape, data))
    if offset != len(binary):
        raise BadTensor(f"{len(binary) - offset} bytes of binary data were not claimed by any input")
    return tensors


def _from_binary(name: str, dtype: str, chunk: bytes, count: int) -> np.ndarray | list[bytes]:
    if dtype == "BYTES":
        items, pos = [], 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                raise BadTensor(f"input {name!r}: truncated BYTES element length")
            (n,) = struct.unpack_from("<I", chunk, pos)
            pos += 4
            if pos + n > len(chunk):
                raise BadTensor(f"input {name!r}: BYTES element of {n} bytes runs past the data")
            items.append(chunk[pos:pos + n])
            pos += n
        if len(items) != count:
            raise BadTensor(f"input {name!r}: shape says {count} elements, binary data holds {len(items)}")
        return items
    np_type = _dtype(name, dtype)
    if len(chunk) != count * np.dtype(np_type).itemsize:
        raise BadTensor(f"input {name!r}: {len(chunk)} bytes do not make {count} {dtype} elements")
    return np.frombuffer(chunk, dtype=np.dtype(np_type).newbyteorder("<")).astype(np_type)


def _from_json(name: str, dtype: str, data: Any, count: int) -> np.ndarray | list[bytes]:
    if dtype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count:
            raise BadTensor(f"input {name!r}: shape says {count} elements, data holds {len(flat)}")
        return [_b64(name, x) for x in flat]
    np_type = _dtype(name, dtype)
    try:
        arr = np.asarray(data, dtype=np_type).reshape(-1)
    except OverflowError:
        raise BadTensor(f"input {name!r}: a value is out of range for {dtype}") from None
    except (ValueError, TypeError):
        raise BadTensor(f"input {name!r}: data is not a list of {dtype} numbers") from None
    if arr.size != count:
        raise BadTensor(f"input {name!r}: shape says {count} elements, data holds {arr.size}")
    return arr


def _flatten(data: Any) -> list[Any]:
    """Nested lists to a flat list, without recursion (the JSON depth is bounded before parsing anyway)."""
    flat, stack = [], [iter([data])]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            flat.append(x)
        else:
            stack.pop()
    return flat



def _b64(name: str, x: Any) -> bytes:
    """JSON BYTES elements carry images as base64 (a string or KServe's ``{"b64": ...}``)."""
    if isinstance(x, dict) and isinstance(x.get("b64"), str):
        x = x["b64"]
    if not isinstance(x, str):
        raise BadTensor(f"input {name!r}: BYTES elements must be base64 strings")
    try:
        return base64.b64decode(x, validate=True)
    except (binascii.Error, ValueError):
        raise BadTensor(f"input {name!r}: BYTES element is not valid base64") from None


def _dtype(name: str, dtype: str) -> Any:
    if dtype not in DATATYPES:
        raise BadTensor(f"input {name!r}: unsupported datatype {dtype!r}")
    return DATATYPES[dtype]


# -- response --------------------------------------------------------------------------------------------
def _requested(req: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    wanted = req.get("outputs") or [{"name": n} for n in names]
    if not isinstance(wanted, list):
        raise BadTensor("'outputs' must be a list")
    for i, spec in enumerate(wanted):
        if not isinstance(spec, dict) or spec.get("name") not in names:
            raise BadTensor(f"outputs[{i}]: unknown output {reprlib.repr(spec)}; this model has {names}")
        if not isinstance(spec.get("parameters") or {}, dict):
            raise BadTensor(f"outputs[{i}]: 'parameters' must be an object")
    return wanted


def _response(req: dict[str, Any], wanted: list[dict[str, Any]], model: Any, names: list[str],
              outputs: list[np.ndarray]) -> Response:
    req_params = req.get("parameters") or {}
    binary_default = bool(isinstance(req_params, dict) and req_params.get("binary_data_output"))
    by_name = dict(zip(names, outputs))
    result, blobs = [], []
    for spec in wanted:
        params = spec.get("parameters") or {}
        arr = by_name[spec["name"]]
        k = params.get("classification", 0)
        if k:
            if not isinstance(k, int) or k < 1 or model.manifest.task != "classify":
                raise BadTensor("'classification' must be a positive integer on a classifier's output")
            arr = classification_strings(model, arr, k)
        elif (task := get_task(model.manifest.task)) is not None:  # a plug-in task shapes its own outputs
            arr = task.oip_output(model, spec["name"], arr, params)
        dtype = "BYTES" if arr.dtype == object else _datatype(arr)
        out: dict[str, Any] = {"name": spec["name"], "datatype": dtype, "shape": list(arr.shape)}
        if params.get("binary_data", binary_default):
            blob = _bytes_blob(arr) if dtype == "BYTES" else np.ascontiguousarray(arr).astype(
                arr.dtype.newbyteorder("<")).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = [str(x) for x in arr.reshape(-1)] if dtype == "BYTES" else arr.reshape(-1).tolist()
        result.append(out)
    doc: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": result}
    if "id" in req:
        doc["id"] = req["id"]
    if not blobs:
        return JSONResponse(doc)
    header = json.dumps(doc, separators=(",", ":")).encode()
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def _datatype(arr: np.ndarray) -> str:
    for name, t in DATATYPES.items():
        if arr.dtype == np.dtype(t):
            return name
    return "FP32"


def _bytes_blob(arr: np.ndarray) -> bytes:
    parts = []
    for x in arr.reshape(-1):
        b = x if isinstance(x, bytes) else str(x).encode()
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)
