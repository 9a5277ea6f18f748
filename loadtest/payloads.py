"""Request bodies for each request kind, built once per image before a run starts.

Kinds (see docs/loadtest.md and the HTTP contract):

- ``classify`` / ``detect`` / ``embed`` — the route of every task the service knows (``service.tasks``):
  ``POST /v1/models/{m}/<kind>`` with the raw image bytes as the body.
- ``identify``: ``POST /v1/galleries/{g}/identify`` with the raw image bytes; ``--model`` names the gallery.
- ``infer``: Open Inference Protocol ``POST /v2/models/{m}/infer`` with a JSON body whose input
  ``image`` (datatype BYTES) holds the base64-encoded file.
- ``infer-binary``: the same request with the binary tensor extension: a JSON header of
  ``Inference-Header-Content-Length`` bytes, then the BYTES element as a 4-byte little-endian
  length followed by the file.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

OTHER_KINDS = ("identify", "infer", "infer-binary")


def native_kinds() -> tuple[str, ...]:
    """The kinds that send an image to a task's native route: every registered task's route."""
    from visionserve.service.tasks import TASKS

    return tuple(t.route for t in TASKS.values())


def kinds() -> tuple[str, ...]:
    """Every request kind (a task registered at run time included)."""
    return (*native_kinds(), *OTHER_KINDS)


KINDS = kinds()  # the built-in tasks' routes, then the others
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MAX_IMAGES = 1024


@dataclass(frozen=True)
class Payload:
    """One HTTP request, independent of the transport."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def sniff_content_type(data: bytes) -> str:
    """The media type of an encoded image from its magic bytes."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:2] == b"BM":
        return "image/bmp"
    return "application/octet-stream"


def load_images(path: Path) -> list[bytes]:
    """The bytes of one image file, or of every image in a directory (sorted, recursive, capped)."""
    if path.is_file():
        return [path.read_bytes()]
    if not path.is_dir():
        raise ValueError(f"--image {path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--image {path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the directory")
    return [p.read_bytes() for p in files[:MAX_IMAGES]]


def model_path(model: str, version: str | None) -> str:
    return f"/models/{model}" + (f"/versions/{version}" if version else "")


def build_payload(
    kind: str,
    model: str,
    image: bytes,
    version: str | None = None,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> Payload:
    """The request that sends ``image`` to ``model`` as ``kind``."""
    extra = dict(headers or {})
    suffix = f"?{query}" if query else ""
    if kind in native_kinds():
        path = f"/v1{model_path(model, version)}/{kind}{suffix}"
        return Payload("POST", path, {"Content-Type": sniff_content_type(image), **extra}, image)
    if kind == "identify":  # the gallery decides the model
        return Payload("POST", f"/v1/galleries/{model}/identify{suffix}",
                       {"Content-Type": sniff_content_type(image), **extra}, image)
    path = f"/v2{model_path(model, version)}/infer{suffix}"
    if kind == "infer":
        tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}
        body = json.dumps({"inputs": [tensor]}).encode()
        return Payload("POST", path, {"Content-Type": "application/json", **extra}, body)
    if kind == "infer-binary":
        element = struct.pack("<I", len(image)) + image
        tensor = {
            "name": "image",
            "shape": [1],
            "datatype": "BYTES",
            "parameters": {"binary_data_size": len(element)},
        }
        header = json.dumps({"inputs": [tensor]}).encode()
        hdrs = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
            **extra,
        }
        return Payload("POST", path, hdrs, header + element)
    raise ValueError(f"--kind must be one of {', '.join(kinds())}, got {kind!r}")
