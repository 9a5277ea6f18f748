"""The Open Inference Protocol's formats (KServe v2, as Triton speaks them), in one place: tensors and their
datatypes, a request's JSON and binary parts → tensors, outputs → the response document and binary part, and
the server, model metadata and model configuration documents. No web framework: ``service.http.oip`` holds
the routes; ``DataPlane.infer`` runs the tensors. A task shapes its own outputs (``Task.oip_output``: classify
answers Triton's ``classification`` extension there).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import reprlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .errors import BadTensor, Unavailable
from .tasks import TASKS

if TYPE_CHECKING:
    from .manifest import Manifest
    from .registry import LoadedModel, Registry

DATATYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
             "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}
IMAGE_INPUT = "image"  # the BYTES input of encoded image files every model takes beside its own tensor
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_RANK = 8
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository"]


@dataclass
class Tensor:
    """An Open Inference Protocol tensor: numeric data as an array, BYTES as a list of bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]


# -- request ---------------------------------------------------------------------------------------------
def parse_request(body: bytes, header_length: str | None, budget: int) -> tuple[dict[str, Any], list[Tensor]]:
    """A request body (JSON, or JSON + binary part of ``header_length`` header bytes) → the request document and
    its input tensors; ``budget`` bounds any tensor's element count (see ``_inputs``)."""
    header, binary = _split(body, header_length)
    req = _json(header)
    return req, _inputs(req, binary, budget)


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
def requested(req: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    wanted = req.get("outputs") or [{"name": n} for n in names]
    if not isinstance(wanted, list):
        raise BadTensor("'outputs' must be a list")
    for i, spec in enumerate(wanted):
        if not isinstance(spec, dict) or spec.get("name") not in names:
            raise BadTensor(f"outputs[{i}]: unknown output {reprlib.repr(spec)}; this model has {names}")
        if not isinstance(spec.get("parameters") or {}, dict):
            raise BadTensor(f"outputs[{i}]: 'parameters' must be an object")
    return wanted


def encode_response(req: dict[str, Any], wanted: list[dict[str, Any]], model: LoadedModel, names: list[str],
                    outputs: list[np.ndarray]) -> tuple[dict[str, Any], bytes | None]:
    """The response document and, when an output is sent as binary data, the JSON header + binary part
    (send that as the body, with ``HEADER_LENGTH`` = ``len(json header)``: see ``binary_body``)."""
    req_params = req.get("parameters") or {}
    binary_default = bool(isinstance(req_params, dict) and req_params.get("binary_data_output"))
    by_name = dict(zip(names, outputs))
    task = TASKS[model.manifest.task]
    result, blobs = [], []
    for spec in wanted:
        params = spec.get("parameters") or {}
        arr = by_name[spec["name"]]
        arr = task.oip_output(model, spec["name"], arr, params)  # the task shapes its outputs
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
        return doc, None
    return doc, b"".join(blobs)


def binary_body(doc: dict[str, Any], blob: bytes) -> tuple[bytes, int]:
    """The binary-tensor extension's body: the compact JSON header, then the binary part; and the header's
    length (``HEADER_LENGTH``)."""
    header = json.dumps(doc, separators=(",", ":")).encode()
    return header + blob, len(header)


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


# -- metadata and configuration ---------------------------------------------------------------------------
def server_metadata() -> dict[str, Any]:
    return {"name": "visionserve", "version": __version__, "extensions": list(EXTENSIONS)}


def metadata(registry: Registry, name: str, version: str | None = None) -> dict[str, Any]:
    """Model metadata; for a model that is UNAVAILABLE (no READY version), from its manifest, with the state
    and the reasons, so that the metadata says why it does not serve."""
    try:
        model = registry.get(name, version)
    except Unavailable:
        m = registry.manifest(name)
        if m is None or registry.versions(name):
            raise
        return {**_metadata(registry, m, None), "state": "UNAVAILABLE"}
    return _metadata(registry, model.manifest, model.provider)


def _metadata(registry: Registry, m: Manifest, provider: str | None) -> dict[str, Any]:
    return {
        "name": m.name,
        "versions": registry.versions(m.name),
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": m.input.name, "datatype": m.input.datatype, "shape": m.input.shape},
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": o.name, "datatype": o.datatype, "shape": o.shape} for o in m.outputs],
        "parameters": {"task": m.task, "execution_provider": provider},
        "version_states": registry.describe(m.name)["version_states"],
    }


def model_config(model: LoadedModel) -> dict[str, Any]:
    """Triton-style model configuration."""
    m = model.manifest
    gpu = model.provider != "CPUExecutionProvider"
    return {
        "name": m.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": model.config.version_policy.triton(),
        "max_batch_size": model.max_batch_size,
        "input": [{"name": m.input.name, "data_type": f"TYPE_{m.input.datatype}",
                   "format": f"FORMAT_{m.input.layout}", "dims": m.input.shape[1:]},
                  {"name": IMAGE_INPUT, "data_type": "TYPE_STRING", "dims": [1], "optional": True}],
        "output": [{"name": o.name, "data_type": f"TYPE_{o.datatype}", "dims": o.shape[1:]}
                   for o in m.outputs],
        "instance_group": [{"name": m.name, "kind": "KIND_GPU" if gpu else "KIND_CPU",
                            "count": len(model.runners)}],
        "dynamic_batching": {"max_queue_delay_microseconds": int(model.config.max_batch_delay_ms * 1000),
                             "preferred_batch_size": [model.plan.batch],
                             "default_queue_policy": {"max_queue_size": model.config.max_queue}},
        "parameters": {"execution_provider": {"string_value": model.provider},
                       "task": {"string_value": m.task}},
    }
