"""The Open Inference Protocol, driven by Triton's own client (tritonclient.http), unchanged."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from visionserve.service.imaging import Preprocessor
from visionserve.service.manifest import Manifest

from .conftest import CAT, CAT_CLASSES, COFFEE, Server


@pytest.fixture()
def client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


def test_health_metadata_and_config(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mobilenet_v2") and client.is_model_ready("mobilenet_v2", "1")
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("mobilenet_v2")
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"input": "FP32", "image": "BYTES"}
    assert meta["outputs"][0]["shape"] == [-1, 1000]
    cfg = client.get_model_config("mobilenet_v2")
    assert cfg["max_batch_size"] >= 8 and cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert client.get_server_metadata()["extensions"]


@pytest.mark.parametrize("binary", [True, False])
def test_fp32_tensor_matches_native_classify(client: triton.InferenceServerClient, server: Server,
                                             mobilenet_repo, binary: bool) -> None:  # type: ignore[no-untyped-def]
    m = Manifest.read(mobilenet_repo / "mobilenet_v2" / "1")
    pre = Preprocessor(m.input, m.preprocess)
    x = np.stack([pre(CAT.read_bytes())[0], pre(COFFEE.read_bytes())[0]])
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    res = client.infer("mobilenet_v2", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
    logits = res.as_numpy("logits")
    assert logits.shape == (2, 1000)
    native = httpx.post(f"{server.url}/v1/models/mobilenet_v2/classify?top_k=1", content=CAT.read_bytes(),
                        headers={"Content-Type": "image/jpeg"}).json()["predictions"][0]
    assert int(logits[0].argmax()) == native["index"] and int(logits[1].argmax()) == 967  # espresso


def test_bytes_images_with_classification_extension(client: triton.InferenceServerClient) -> None:
    images = np.array([CAT.read_bytes(), COFFEE.read_bytes()], dtype=object)
    inp = triton.InferInput("image", [2], "BYTES")
    inp.set_data_from_numpy(images, binary_data=True)
    res = client.infer("mobilenet_v2", [inp], outputs=[triton.InferRequestedOutput("logits", class_count=3)])
    top = res.as_numpy("logits")
    assert top.shape == (2, 3)
    score, index, _label = top[0, 0].decode().split(":", 2)
    assert int(index) in CAT_CLASSES and 0.5 < float(score) <= 1
    assert top[1, 0].decode().endswith(":967:espresso")


def test_json_base64_image_and_binary_response(server: Server) -> None:
    req = {"id": "42", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "data": [base64.b64encode(CAT.read_bytes()).decode()]}],
           "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    r = httpx.post(f"{server.url}/v2/models/mobilenet_v2/versions/1/infer", json=req, timeout=30)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:n])
    assert header["id"] == "42" and header["outputs"][0]["parameters"]["binary_data_size"] == 4000
    logits = np.frombuffer(r.content[n:], dtype="<f4")
    assert int(logits.argmax()) in CAT_CLASSES


def _binary(header: dict[str, object], blob: bytes) -> tuple[bytes, dict[str, str]]:
    h = json.dumps(header).encode()
    return h + blob, {"Inference-Header-Content-Length": str(len(h)), "Content-Type": "application/octet-stream"}


@pytest.mark.parametrize("case, words", [
    ({"inputs": []}, "non-empty 'inputs'"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": [0.0] * 12}]}, "shape"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": [0.0] * 5}]},
     "elements"),
    ({"inputs": [{"name": "input", "datatype": "INT8", "shape": [1], "data": [1]}]}, "must be FP32"),
    ({"inputs": [{"name": "zzz", "datatype": "FP32", "shape": [1], "data": [1]}]}, "unknown input"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%notbase64"]}]}, "base64"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                  "data": [base64.b64encode(b"not an image").decode()]}]}, "decode"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
      "outputs": [{"name": "nope"}]}, "unknown output"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224],
                  "parameters": {"binary_data_size": 999}}]}, "binary_data_size"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": ["NaN"] * 150528}]},
     "NaN"),
    ("not json at all", "JSON"),
])
def test_malformed_tensors_are_400(server: Server, case: object, words: str) -> None:
    body = case.encode() if isinstance(case, str) else json.dumps(case).encode()
    r = httpx.post(f"{server.url}/v2/models/mobilenet_v2/infer", content=body, timeout=30)
    assert r.status_code == 400, r.text
    assert words.lower() in r.json()["error"].lower()


def test_truncated_binary_bytes_element_is_400(server: Server) -> None:
    blob = struct.pack("<I", 1000) + b"short"
    body, headers = _binary({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": len(blob)}}]}, blob)
    r = httpx.post(f"{server.url}/v2/models/mobilenet_v2/infer", content=body, headers=headers)
    assert r.status_code == 400 and "runs past" in r.json()["error"]


def test_triton_client_sees_errors_as_exceptions(client: triton.InferenceServerClient) -> None:
    inp = triton.InferInput("input", [1, 3, 224, 224], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", [inp])
    big = triton.InferInput("image", [64], "BYTES")
    big.set_data_from_numpy(np.array([CAT.read_bytes()[:100]] * 64, dtype=object))
    with pytest.raises(InferenceServerException, match="max_batch_size"):
        client.infer("mobilenet_v2", [big])
