"""Fuzzing the request parsers of a real server process: whatever a client sends, never a 5xx (issue 13).

Hypothesis generates native-API bodies, content types and query strings, Open Inference Protocol requests
(JSON built from the protocol's own fields with hostile values, random JSON, the binary extension with lying
lengths) and raw HTTP paths. Every answer must be < 500, and every error the contract's ``{"error": ...}``.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import Server, start_server, stop_server
from tests.onnx_builders import write_conv_stack

SIZE = 32
BUDGET = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = write_conv_stack(tmp_path_factory.mktemp("fuzz_repo"), "m", size=SIZE, width=8, depth=1)
    s = start_server(repo, tmp_path_factory.mktemp("fuzz"), env={
        "VISIONSERVE_WARMUP": "false", "VISIONSERVE_MAX_BODY_BYTES": str(2 << 20),
        "VISIONSERVE_MAX_PIXELS": str(4_000_000)})
    yield s
    assert s.process.poll() is None, "the server died under fuzzing:\n" + s.output()
    stop_server(s)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def check(r: httpx.Response, deadline: str | None = None) -> None:
    """Never a 5xx, except the contract's 504 when the request carried an ``X-Request-Timeout-Ms`` that passed
    (a fuzzer's 1 ms deadline on a valid image is a legitimate 504, not a server error; a header the server
    does not accept is a 422 before any work, so a 504 can only follow one it accepted)."""
    if r.status_code == 504 and deadline is not None:
        assert "deadline" in r.json()["error"], r.text[:300]
        return
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        doc = r.json()
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str), r.text[:300]


def png(width: int, height: int, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


# -- native API -------------------------------------------------------------------------------------------
CONTENT_TYPES = st.sampled_from(["image/jpeg", "image/png", "application/octet-stream", "multipart/form-data",
                                 "multipart/form-data; boundary=xyz", "text/plain", "", "image/webp;;",
                                 "image/jpeg; charset=utf-8"])
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=12)
QUERY_VALUES = st.one_of(st.integers(-2**70, 2**70).map(str), st.text(max_size=12), st.just("nan"),
                         st.just("1e999"))


@st.composite
def image_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "png", "truncated", "corrupt"]))
    if kind == "bytes":
        return draw(st.binary(max_size=2048))
    data = png(draw(st.integers(1, 3000)), draw(st.integers(1, 40)),
               draw(st.sampled_from(["RGB", "L", "I;16", "LA", "P", "1", "RGBA"])))
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "corrupt":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    return data


@BUDGET
@given(body=image_bodies(), ctype=CONTENT_TYPES, top_k=QUERY_VALUES,
       route=st.sampled_from(["/v1/models/m/classify", "/v1/models/m/versions/1/classify",
                              "/v1/models/m/versions/x/classify", "/v1/models/m/detect", "/v1/models/%00/classify"]),
       timeout=st.one_of(st.none(), st.integers(-2**70, 2**70).map(str), HEADER_TEXT))
@example(body=png(20000, 1, "RGB"), ctype="image/png", top_k="5", route="/v1/models/m/classify", timeout=None)
@example(body=png(1, 20000, "I;16"), ctype="image/png", top_k="5", route="/v1/models/m/classify", timeout=None)
def test_native_classify_never_5xx(client: httpx.Client, body: bytes, ctype: str, top_k: str, route: str,
                                   timeout: str | None) -> None:
    headers = {"content-type": ctype} if ctype else {}
    if timeout is not None:
        headers["x-request-timeout-ms"] = timeout
    check(client.post(route, params={"top_k": top_k}, content=body, headers=headers), deadline=timeout)


@BUDGET
@given(parts=st.lists(st.tuples(st.sampled_from(["image", "file", ""]), st.binary(max_size=512)), max_size=4),
       boundary=st.sampled_from(["b0undary", "", "x" * 100]))
def test_native_multipart_never_5xx(client: httpx.Client, parts: list[tuple[str, bytes]], boundary: str) -> None:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="a"\r\n\r\n'.encode()
                    + data + b"\r\n" for name, data in parts) + f"--{boundary}--\r\n".encode()
    check(client.post("/v1/models/m/classify", content=body,
                      headers={"content-type": f"multipart/form-data; boundary={boundary}"}))


# -- Open Inference Protocol --------------------------------------------------------------------------------
DATATYPES = st.sampled_from(["FP32", "FP16", "FP64", "INT8", "UINT8", "INT64", "BOOL", "BYTES", "STRING", ""])
HOSTILE_INTS = st.sampled_from([0, -1, 1, 3, SIZE, 2**31, 2**32, 2**62, 2**63, 2**64, 2**70, -2**63])
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=8))
ANY_JSON = st.recursive(JSON_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=6), inner,
                                                                              max_size=4)), max_leaves=20)


@st.composite
def oip_inputs(draw: st.DrawFn) -> dict[str, Any]:
    dtype = draw(DATATYPES)
    shape = draw(st.one_of(st.lists(HOSTILE_INTS, max_size=5), st.just([1, 3, SIZE, SIZE]), ANY_JSON))
    tensor: dict[str, Any] = {"name": draw(st.sampled_from(["input", "image", "other", 7])),
                              "datatype": dtype, "shape": shape}
    if dtype == "BYTES":
        images = st.one_of(st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
                           st.just(base64.b64encode(png(40, 30, "RGB")).decode()),
                           st.text(max_size=10), st.dictionaries(st.just("b64"), st.text(max_size=8)))
        tensor["data"] = draw(st.lists(images, max_size=3))
    else:
        tensor["data"] = draw(st.one_of(st.lists(JSON_LEAVES, max_size=8), ANY_JSON,
                                        st.just(np.zeros(3 * SIZE * SIZE).tolist())))
    if draw(st.booleans()):
        tensor["parameters"] = draw(st.one_of(ANY_JSON, st.fixed_dictionaries(
            {"binary_data_size": st.one_of(HOSTILE_INTS, ANY_JSON)})))
    return tensor


@st.composite
def oip_requests(draw: st.DrawFn) -> dict[str, Any]:
    req: dict[str, Any] = {"inputs": draw(st.lists(oip_inputs(), min_size=0, max_size=2))}
    if draw(st.booleans()):
        req["outputs"] = draw(st.one_of(ANY_JSON, st.lists(st.fixed_dictionaries(
            {"name": st.sampled_from(["logits", "x"]),
             "parameters": st.one_of(ANY_JSON, st.fixed_dictionaries(
                 {"classification": st.one_of(HOSTILE_INTS, ANY_JSON), "binary_data": ANY_JSON}))}), max_size=2)))
    if draw(st.booleans()):
        req["id"] = draw(ANY_JSON)
    if draw(st.booleans()):
        req["parameters"] = draw(ANY_JSON)
    return req


ISSUE_CASES = [  # the nine inputs that answered 500 before (issue 13), and one hypothesis found later
    b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "data": json.loads("[" * 900 + '"aGk="' + "]" * 900)}]}).encode(),
    json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2**62, 4], "data": []}]}).encode(),
    json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2**32, 2**32], "data": []}]}).encode(),
    json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 2**62], "data": []}]}).encode(),
    json.dumps({"inputs": [{"name": "input", "datatype": "INT8", "shape": [1], "data": [1000]}]}).encode(),
    json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1], "data": [-1]}]}).encode(),
    json.dumps({"inputs": [{"name": "input", "datatype": "INT64", "shape": [1], "data": [2**70]}]}).encode(),
    json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE],
                            "data": [0.0] * (3 * SIZE * SIZE)}], "id": json.loads("[" * 900 + "]" * 900)}).encode(),
    json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [0]}],
                "outputs": [{"name": json.loads("[" * 900 + "]" * 900)}]}).encode(),
]


@pytest.mark.parametrize("body", ISSUE_CASES, ids=range(len(ISSUE_CASES)))
def test_known_oip_bombs_get_4xx(client: httpx.Client, body: bytes) -> None:
    r = client.post("/v2/models/m/infer", content=body, headers={"content-type": "application/json"})
    check(r)
    assert 400 <= r.status_code < 500


@BUDGET
@given(req=oip_requests())
def test_oip_json_never_5xx(client: httpx.Client, req: dict[str, Any]) -> None:
    check(client.post("/v2/models/m/infer", content=json.dumps(req).encode(),
                      headers={"content-type": "application/json"}))


@BUDGET
@given(header=st.one_of(ANY_JSON.map(lambda v: json.dumps(v).encode()), oip_requests().map(
           lambda r: json.dumps(r).encode())),
       tail=st.binary(max_size=256), declared=st.one_of(st.none(), st.integers(-5, 2**40).map(str), HEADER_TEXT),
       lengths=st.lists(st.integers(0, 2**32 - 1), max_size=3))
def test_oip_binary_extension_never_5xx(client: httpx.Client, header: bytes, tail: bytes, declared: str | None,
                                        lengths: list[int]) -> None:
    blob = b"".join(struct.pack("<I", n) for n in lengths) + tail
    headers = {"content-type": "application/octet-stream"}
    headers["inference-header-content-length"] = declared if declared is not None else str(len(header))
    check(client.post("/v2/models/m/infer", content=header + blob, headers=headers))


@BUDGET
@given(path=st.text(alphabet=st.sampled_from("/abcmv12%.~_-"), max_size=40),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]))
def test_any_path_and_method_never_5xx(client: httpx.Client, path: str, method: str) -> None:
    r = client.request(method, "/" + path.lstrip("/"))
    assert r.status_code < 500, (method, path, r.status_code, r.text[:200])


def test_fuzzing_left_the_server_serving(client: httpx.Client, tmp_path: Path) -> None:
    r = client.post("/v1/models/m/classify", content=png(64, 48, "RGB"), headers={"content-type": "image/png"})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5
