"""The service over real HTTP: classification, batching equivalence, the contract's errors, metrics."""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from visionserve.convert.samples import encode, sample_image

from .conftest import CAT, CAT_CLASSES, COFFEE, Server, start_server, stop_server

JPEG = {"Content-Type": "image/jpeg"}


def classify(server: Server, body: bytes, *, headers: dict[str, str] | None = None, params: str = "",
             model: str = "mobilenet_v2") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{model}/classify{params}", content=body,
                      headers=headers if headers is not None else JPEG, timeout=30)


def test_classifies_the_cat(server: Server) -> None:
    r = classify(server, CAT.read_bytes(), params="?top_k=3")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "mobilenet_v2" and body["version"] == "1"
    preds = body["predictions"]
    assert len(preds) == 3 and preds[0]["index"] in CAT_CLASSES
    assert preds[0]["label"] in {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def test_versioned_path_multipart_and_png_agree(server: Server) -> None:
    raw = classify(server, CAT.read_bytes()).json()["predictions"]
    files = {"image": ("cat.jpg", CAT.read_bytes(), "image/jpeg")}
    mp = httpx.post(f"{server.url}/v1/models/mobilenet_v2/versions/1/classify", files=files, timeout=30)
    assert mp.status_code == 200, mp.text
    assert mp.json()["predictions"] == raw
    png = encode(Image.open(CAT), "PNG")
    r = classify(server, png, headers={"Content-Type": "image/png"})
    assert r.json()["predictions"][0]["index"] == raw[0]["index"]


def test_concurrent_requests_are_batched_and_equal_their_single_answers(server: Server) -> None:
    images = [encode(sample_image(n)) for n in ("chelsea", "coffee", "astronaut", "rocket", "motorcycle")]
    alone = [classify(server, img, params="?top_k=5").json()["predictions"] for img in images]

    def batch_count() -> tuple[float, float]:
        text = httpx.get(f"{server.url}/metrics").text
        s = re.search(r'visionserve_batch_size_sum\{model="mobilenet_v2",version="1"\} (\S+)', text)
        c = re.search(r'visionserve_batch_size_count\{model="mobilenet_v2",version="1"\} (\S+)', text)
        assert s and c
        return float(s.group(1)), float(c.group(1))

    before = batch_count()

    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            reqs = [client.post(f"{server.url}/v1/models/mobilenet_v2/classify?top_k=5", content=images[i % 5],
                                headers=JPEG) for i in range(40)]
            return await asyncio.gather(*reqs)

    responses = asyncio.run(storm())
    after = batch_count()
    items, batches = after[0] - before[0], after[1] - before[1]
    assert items == 40 and batches < 40, "concurrent requests should share batches"
    for i, r in enumerate(responses):
        assert r.status_code == 200
        got = r.json()["predictions"]
        want = alone[i % 5]
        assert [p["index"] for p in got] == [p["index"] for p in want]
        np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in want], atol=1e-5)


def test_models_listing_and_open_inference_metadata(server: Server) -> None:
    models = httpx.get(f"{server.url}/v1/models").json()["models"]
    (mn,) = [m for m in models if m["name"] == "mobilenet_v2"]
    assert mn["versions"] == ["1"] and mn["task"] == "classify" and mn["state"] == "READY"
    assert mn["execution_provider"] == "CPUExecutionProvider" and mn["input"]["shape"] == [-1, 3, 224, 224]
    assert httpx.get(f"{server.url}/v2").json()["name"] == "visionserve"
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v2/models/mobilenet_v2/versions/1/ready").status_code == 200
    cfg = httpx.get(f"{server.url}/v2/models/mobilenet_v2/config").json()
    assert cfg["max_batch_size"] == 32 and cfg["input"][0]["dims"] == [3, 224, 224]
    assert httpx.get(f"{server.url}/docs").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "/v1/models/{model}/classify" in paths and "/v2/models/{model}/infer" in paths


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, "PNG")  # 36 M pixels in ~40 kB
    return buf.getvalue()


@pytest.mark.parametrize("body, headers, params, status, words", [
    (b"", JPEG, "", 400, "empty"),
    (b"\x00garbage\xff" * 100, JPEG, "", 400, "cannot decode"),
    ("truncated", JPEG, "", 400, "decode"),
    ("cat", {"Content-Type": "text/plain"}, "", 415, "Content-Type"),
    ("cat", JPEG, "?top_k=0", 422, "top_k"),
    ("cat", JPEG, "?top_k=abc", 422, "top_k"),
    ("cat", {**JPEG, "X-Request-Timeout-Ms": "soon"}, "", 422, "X-Request-Timeout-Ms"),
    ("big", JPEG, "", 413, "limit"),
    ("bomb", {"Content-Type": "image/png"}, "", 413, "pixels"),
    ("cat", {"Content-Type": "multipart/form-data; boundary=xyz"}, "", 400, "multipart"),
])
def test_bad_requests_get_clear_json_errors(server: Server, body: bytes | str, headers: dict[str, str],
                                            params: str, status: int, words: str) -> None:
    data = {
        "cat": CAT.read_bytes(), "truncated": CAT.read_bytes()[:5000], "big": b"\xff" * (9 * 1024 * 1024),
        "bomb": _bomb_png(),
    }.get(body, body) if isinstance(body, str) else body
    r = classify(server, data, headers=headers, params=params)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert words.lower() in r.json()["error"].lower()


def test_unknown_model_and_version_are_404(server: Server) -> None:
    for path in ("/v1/models/nope/classify", "/v1/models/mobilenet_v2/versions/7/classify"):
        r = httpx.post(server.url + path, content=CAT.read_bytes(), headers=JPEG)
        assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(f"{server.url}/v2/models/nope").status_code == 404
    assert httpx.get(f"{server.url}/no/such/route").json() == {"error": "not found"}


def test_the_server_survived_and_counted_outcomes(server: Server) -> None:
    assert classify(server, COFFEE.read_bytes()).json()["predictions"][0]["label"] == "espresso"
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("visionserve_requests_total", "visionserve_request_duration_seconds_bucket",
                 "visionserve_queue_wait_seconds_bucket", "visionserve_preprocess_seconds_bucket",
                 "visionserve_inference_seconds_bucket", "visionserve_batch_size_bucket", "visionserve_queue_depth",
                 "visionserve_inflight_requests", "visionserve_model_load_seconds", "process_cpu_seconds_total"):
        assert name in text, name
    assert re.search(r'visionserve_requests_total\{endpoint="classify",model="mobilenet_v2",outcome="bad_image"', text)
    assert 'provider="CPUExecutionProvider"' in text


def test_overload_answers_503_with_retry_after_and_loses_no_accepted_work(
        mobilenet_repo: Path, tmp_path: Path) -> None:
    s = start_server(mobilenet_repo, tmp_path, env={"VISIONSERVE_DEFAULTS__MAX_QUEUE": "2",
                                                    "VISIONSERVE_DEFAULTS__MAX_BATCH_SIZE": "1"})
    try:
        async def storm() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(
                    f"{s.url}/v1/models/mobilenet_v2/classify", content=CAT.read_bytes(), headers=JPEG)
                    for _ in range(30)))

        rs = asyncio.run(storm())
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
        for r in rs:
            if r.status_code == 503:
                assert r.headers["retry-after"] and "overloaded" in r.json()["error"]
            else:
                assert r.json()["predictions"][0]["index"] in CAT_CLASSES
        # a request deadline that cannot be met: 504, not a hang
        r = httpx.post(f"{s.url}/v1/models/mobilenet_v2/classify", content=CAT.read_bytes(),
                       headers={**JPEG, "X-Request-Timeout-Ms": "0.001"}, timeout=10)
        assert r.status_code == 504 and "deadline" in r.json()["error"]
    finally:
        assert stop_server(s) == 0


def test_api_key_guards_inference_but_not_health(mobilenet_repo: Path, tmp_path: Path) -> None:
    s = start_server(mobilenet_repo, tmp_path, env={"VISIONSERVE_API_KEY": "s3cret"})
    try:
        assert classify(s, CAT.read_bytes()).status_code == 401
        assert classify(s, CAT.read_bytes(), headers={**JPEG, "X-API-Key": "wrong"}).status_code == 401
        assert classify(s, CAT.read_bytes(), headers={**JPEG, "X-API-Key": "s3cret"}).status_code == 200
        assert classify(s, CAT.read_bytes(), headers={**JPEG, "Authorization": "Bearer s3cret"}).status_code == 200
        r = httpx.post(f"{s.url}/v2/models/mobilenet_v2/infer", content=json.dumps({"inputs": []}))
        assert r.status_code == 401
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200
        assert httpx.get(f"{s.url}/metrics").status_code == 200
    finally:
        stop_server(s)


def test_sigterm_finishes_accepted_requests_then_exits_cleanly(mobilenet_repo: Path, tmp_path: Path) -> None:
    s = start_server(mobilenet_repo, tmp_path)

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            reqs = [asyncio.create_task(client.post(f"{s.url}/v1/models/mobilenet_v2/classify",
                                                    content=CAT.read_bytes(), headers=JPEG)) for _ in range(24)]
            await asyncio.sleep(0.15)  # requests are in flight
            s.process.send_signal(15)
            return await asyncio.gather(*reqs, return_exceptions=True)

    results = asyncio.run(scenario())
    code = s.process.wait(60)
    assert code == 0, s.output()
    answered = [r for r in results if isinstance(r, httpx.Response)]
    assert answered, results
    # every request the server accepted was answered in full; none failed with a server error
    assert all(r.status_code == 200 for r in answered), [r.status_code for r in answered]
    assert "stopped" in s.output()
