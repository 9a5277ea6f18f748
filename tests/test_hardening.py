"""What a hostile or unlucky client can do to a real server process (issue 13): connection hygiene, admission
at the door, the API key, offline docs, and a drain on SIGTERM that answers everything it accepted."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import CAT, Server, start_server, stop_server
from tests.onnx_builders import write_conv_stack

FAST = {"name": "fast", "size": 32, "width": 8, "depth": 1}
SLOW = {"name": "slow", "size": 192, "width": 64, "depth": 8}  # 0.15-0.5 s an image on one thread
SLOWEST = {"name": "slowest", "size": 192, "width": 64, "depth": 40}  # ≥ 0.6 s an image, however fast the CPU
ONE_WORKER = {"VISIONSERVE_DEFAULTS__INSTANCES": "1", "VISIONSERVE_DEFAULTS__SOLO_THREADS": "0",
              "VISIONSERVE_DEFAULTS__PREFERRED_BATCH_SIZE": "1", "VISIONSERVE_WARMUP": "false"}
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hardening_repo")
    for spec in (FAST, SLOW, SLOWEST):
        write_conv_stack(root, spec["name"], size=spec["size"], width=spec["width"], depth=spec["depth"])
    return root


@pytest.fixture(scope="module")
def guarded(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """Tight connection limits so that each one can be hit quickly."""
    tmp = tmp_path_factory.mktemp("guarded")
    s = start_server(repo, tmp, env={**ONE_WORKER, "VISIONSERVE_HEADER_TIMEOUT_S": "1.5",
                                     "VISIONSERVE_BODY_TIMEOUT_S": "1.5", "VISIONSERVE_MAX_CONNECTIONS": "12",
                                     "VISIONSERVE_MAX_BODY_BYTES": str(1 << 20)})
    yield s
    stop_server(s)


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_one(sock: socket.socket, limit: float = 10) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the next response, reading nothing beyond it (pipelined ones may follow)."""
    sock.settimeout(limit)
    data = b""
    while b"\r\n\r\n" not in data:
        byte = sock.recv(1)
        if not byte:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += byte
    lines = data.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    n = int(headers.get("content-length", "0"))
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def read_response(sock: socket.socket, limit: float = 10) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, closed) of one response; ``closed``: the server ended the connection after it."""
    status, headers, body = read_one(sock, limit)
    try:
        sock.settimeout(3)
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    except ConnectionResetError:
        raise AssertionError("the server reset the connection after its answer") from None
    return status, headers, body, closed


def json_error(body: bytes) -> str:
    doc = json.loads(body)
    assert set(doc) == {"error"} and doc["error"], doc
    return str(doc["error"])


# -- connection hygiene -----------------------------------------------------------------------------------
def test_oversized_headers_get_431_json_and_close(guarded: Server) -> None:
    for size in (40_000, 8 << 20):  # one header line over the limit; a header far larger than any buffer
        with connect(guarded) as sock:
            try:
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before the whole 8 MB was read: what we want, the answer is still there
            status, headers, body, closed = read_response(sock)
        assert status == 431 and headers["content-type"] == "application/json" and closed
        assert "header" in json_error(body)


def test_slow_headers_time_out_with_408(guarded: Server) -> None:
    with connect(guarded) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        status, _, body, closed = read_response(sock)
        took = time.monotonic() - started
    assert status == 408 and closed and "headers" in json_error(body)
    assert 1.0 < took < 6, took


def test_silent_connection_is_closed(guarded: Server) -> None:
    with connect(guarded) as sock:
        sock.settimeout(8)
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert time.monotonic() - started < 6


def test_slow_body_times_out_with_408(guarded: Server) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"POST /v1/models/fast/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 5000\r\n\r\n" + b"\xff" * 10)
        status, _, body, closed = read_response(sock)
    assert status == 408 and closed and "body" in json_error(body)


def test_declared_huge_body_is_refused_without_reading_it(guarded: Server) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"POST /v1/models/fast/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 10000000000\r\n\r\n")
        status, headers, body, _ = read_response(sock, limit=10)
        assert status == 413 and headers.get("connection") == "close" and "limit" in json_error(body)
        # the server stops reading: pushing the declared 10 GB fails long before it is through
        sent, started = 0, time.monotonic()
        with pytest.raises(OSError):
            sock.settimeout(5)
            while time.monotonic() - started < 20:
                sent += sock.send(b"\0" * 65536)
        assert sent < 200 << 20, sent


def test_malformed_http_gets_json_400(guarded: Server) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"GARBAGE / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body, closed = read_response(sock)
    assert status == 400 and headers["content-type"] == "application/json" and closed
    json_error(body)


def test_connections_over_the_cap_get_json_503(guarded: Server) -> None:
    held = [connect(guarded) for _ in range(12)]
    try:
        time.sleep(0.3)
        with connect(guarded) as extra:
            status, headers, body, closed = read_response(extra)
        assert status == 503 and closed and headers.get("retry-after") and "connections" in json_error(body)
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert httpx.get(f"{guarded.url}/v2/health/ready", timeout=10).status_code == 200  # room again


def test_normal_requests_keep_alive(guarded: Server) -> None:
    jpeg = CAT.read_bytes()
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        for _ in range(3):
            r = client.post("/v1/models/fast/classify", content=jpeg, headers={"content-type": "image/jpeg"})
            assert r.status_code == 200 and r.headers.get("connection") != "close"


# -- admission at the door ----------------------------------------------------------------------------
def test_admission_refuses_at_once_over_max_inflight(repo: Path, tmp_path: Path) -> None:
    s = start_server(repo, tmp_path, env={**ONE_WORKER, "VISIONSERVE_DEFAULTS__MAX_INFLIGHT": "2"})
    jpeg = CAT.read_bytes()

    def classify(_: int) -> tuple[int, float, str | None]:
        started = time.monotonic()
        r = httpx.post(f"{s.url}/v1/models/slow/classify", content=jpeg, timeout=60,
                       headers={"content-type": "image/jpeg"})
        return r.status_code, time.monotonic() - started, r.headers.get("retry-after")

    try:
        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(classify, range(8)))
        metrics = httpx.get(f"{s.url}/metrics", timeout=10).text
    finally:
        stop_server(s)
    ok = [t for code, t, _ in results if code == 200]
    refused = [(t, ra) for code, t, ra in results if code == 503]
    assert len(ok) >= 2 and len(ok) + len(refused) == 8 and refused, results
    # refused before the body was decoded or any image inferred: sooner than the first answer (≈ 0.5 s)
    assert max(t for t, _ in refused) < min(ok), results
    assert all(ra for _, ra in refused)
    assert re.search(r'visionserve_requests_total\{.*model="slow".*outcome="unavailable".*\} [1-9]', metrics)


# -- API key ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    tmp = tmp_path_factory.mktemp("keyed")
    key_file = tmp / "api-key"
    key_file.write_text(f"  {KEY}\n")  # a Kubernetes secret mount, with a trailing newline
    s = start_server(repo, tmp, env={**ONE_WORKER, "VISIONSERVE_API_KEY_FILE": str(key_file)})
    yield s
    stop_server(s)


PROTECTED = [("GET", "/v1/models"), ("GET", "/v2"), ("GET", "/"), ("GET", "/v2/models/fast"),
             ("GET", "/v2/models/fast/versions/1"), ("GET", "/v2/models/fast/config"),
             ("GET", "/v2/models/fast/ready"), ("POST", "/v2/models/fast/infer"),
             ("POST", "/v1/models/fast/classify"), ("GET", "/v2/models/nope"), ("GET", "/no/such/route")]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_api_key_protects_models_and_metadata(keyed: Server, method: str, path: str) -> None:
    r = httpx.request(method, keyed.url + path, timeout=10)
    assert r.status_code == 401 and "API key" in r.json()["error"]
    r = httpx.request(method, keyed.url + path, timeout=10, headers={"x-api-key": "wrong"})
    assert r.status_code == 401
    r = httpx.request(method, keyed.url + path, timeout=10, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code != 401


def test_health_metrics_and_docs_stay_open(keyed: Server) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/docs", "/openapi.json"):
        assert httpx.get(keyed.url + path, timeout=10).status_code == 200, path


def test_unknown_model_does_not_list_the_others(keyed: Server) -> None:
    r = httpx.get(f"{keyed.url}/v2/models/nope", headers={"x-api-key": KEY}, timeout=10)
    assert r.status_code == 404
    assert "fast" not in r.text and "slow" not in r.text


def test_metrics_can_be_protected(repo: Path, tmp_path: Path) -> None:
    s = start_server(repo, tmp_path, env={**ONE_WORKER, "VISIONSERVE_API_KEY": KEY,
                                          "VISIONSERVE_PROTECT_METRICS": "true"})
    try:
        assert httpx.get(f"{s.url}/metrics", timeout=10).status_code == 401
        assert httpx.get(f"{s.url}/metrics", timeout=10, headers={"x-api-key": KEY}).status_code == 200
        assert httpx.get(f"{s.url}/v2/health/live", timeout=10).status_code == 200
    finally:
        stop_server(s)


def test_docs_load_nothing_from_another_host(keyed: Server) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(keyed.url + page, timeout=10).text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"url: ?'([^']+)'", html)
        assets = [u for u in urls if u.endswith((".js", ".css"))]
        assert assets, html
        for url in urls:
            assert not url.startswith(("http:", "https:", "//")), url
        for url in assets:
            r = httpx.get(keyed.url + url, timeout=10)
            assert r.status_code == 200 and len(r.content) > 10_000, url


# -- SIGTERM --------------------------------------------------------------------------------------------
def request_bytes(path: str, body: bytes = b"", ctype: str = "image/jpeg") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def test_sigterm_finishes_what_was_accepted_and_exits_0(repo: Path, tmp_path: Path) -> None:
    # idle connections kept 5 s into the drain: this test's own readiness request, sent after the signal,
    # must not race the grace period on a loaded machine
    s = start_server(repo, tmp_path, env={**ONE_WORKER, "VISIONSERVE_DRAIN_IDLE_CLOSE_S": "5"})
    jpeg = CAT.read_bytes()
    busy, idle = connect(s), connect(s)
    try:
        idle.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(idle)[0] == 200
        for _ in range(3):  # three requests queued on the one slow worker (≈ 1.5 s of work)
            busy.sendall(request_bytes("/v1/models/slow/classify", jpeg))
        time.sleep(0.3)
        s.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # readiness turns 503 at once, answered on a connection opened before the signal, which then closes
        idle.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body, closed = read_response(idle)
        assert status == 503 and closed
        assert "shutting down" in json_error(body)
        # three pipelined requests on one connection: all three answered, the last with Connection: close
        for _ in range(2):
            status, _, body = read_one(busy, limit=30)
            assert status == 200 and json.loads(body)["predictions"], body
        status, headers, body, closed = read_response(busy, limit=30)
        assert status == 200 and json.loads(body)["predictions"], body
        assert headers.get("connection") == "close" and closed
        rc = s.process.wait(timeout=30)
    finally:
        busy.close()
        idle.close()
        stop_server(s)
    assert rc == 0, s.output()
    with pytest.raises(OSError):  # the listener is gone
        connect(s)


def test_drain_timeout_answers_json_503_and_exits_nonzero(repo: Path, tmp_path: Path) -> None:
    s = start_server(repo, tmp_path, env={**ONE_WORKER, "VISIONSERVE_GRACEFUL_TIMEOUT_S": "0.5"})
    jpeg = CAT.read_bytes()
    socks = [connect(s) for _ in range(4)]
    try:
        for sock in socks:  # ≥ 2.4 s of work on one worker on any machine: more than the 0.5 s drain
            sock.sendall(request_bytes("/v1/models/slowest/classify", jpeg))
        time.sleep(0.3)
        s.process.send_signal(signal.SIGTERM)
        answers = [read_response(sock, limit=30) for sock in socks]
        rc = s.process.wait(timeout=30)
    finally:
        for sock in socks:
            sock.close()
        stop_server(s)
    statuses = sorted(a[0] for a in answers)
    assert 503 in statuses and set(statuses) <= {200, 503}, statuses
    for status, headers, body, _ in answers:
        if status == 503:
            assert headers["content-type"] == "application/json" and "drain" in json_error(body)
    assert rc == 3, s.output()


def test_sigterm_when_idle_exits_within_seconds(repo: Path, tmp_path: Path) -> None:
    s = start_server(repo, tmp_path, env=ONE_WORKER)
    held = [connect(s) for _ in range(20)]  # idle keep-alive connections do not hold the exit up
    try:
        started = time.monotonic()
        s.process.send_signal(signal.SIGTERM)
        rc = s.process.wait(timeout=30)
        took = time.monotonic() - started
    finally:
        for sock in held:
            sock.close()
        stop_server(s)
    assert rc == 0 and took < 5, (rc, took)
