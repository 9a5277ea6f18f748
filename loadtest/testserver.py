"""A tiny HTTP/1.1 server with known behaviour, to test and calibrate the load generator.

It answers the visionserve routes the generator uses (classify, detect, OIP infer, /metrics,
/v1/models) after an injected latency, and can return 503s, make every Nth request slow, or stall
every request that arrives inside periodic stall windows. It checks that request bodies are
encoded as the contract says (400 otherwise) and exposes visionserve-style histograms.

    python -m visionserve.loadtest.testserver --port 0 --latency-ms 5 --error-every 10
    # prints "listening on http://127.0.0.1:PORT" once ready
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import struct
import time
from dataclasses import dataclass

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}


@dataclass
class Behaviour:
    latency_ms: float = 0.0
    slow_every: int = 0  # every Nth request takes slow_ms instead
    slow_ms: float = 0.0
    error_every: int = 0  # every Nth request gets a 503
    stall_period_s: float = 0.0  # stall windows repeat with this period, from the first request
    stall_s: float = 0.0  # ...and last this long (at the end of each period)
    batch_size: int = 1  # what /metrics reports as the mean batch size
    metrics: bool = True
    validate: bool = True


class _State:
    def __init__(self, b: Behaviour) -> None:
        self.b = b
        self.n = 0
        self.first: float | None = None
        self.sums: dict[str, float] = {}

    def observe(self, model: str, name: str, value: float) -> None:
        for suffix, v in (("_sum", value), ("_count", 1.0)):
            key = f'{name}{suffix}{{model="{model}",version="1"}}'
            self.sums[key] = self.sums.get(key, 0.0) + v

    def metrics_text(self) -> bytes:
        lines = ["# HELP visionserve_batch_size Requests per batch.", "# TYPE visionserve_batch_size histogram"]
        lines += [f"{k} {v}" for k, v in sorted(self.sums.items())]
        lines.append('visionserve_batch_size_bucket{model="decoy",version="1",le="+Inf"} 3')
        lines.append('visionserve_batch_size_sum{model="decoy",version="1"} 300')
        lines.append('visionserve_batch_size_count{model="decoy",version="1"} 3')
        return ("\n".join(lines) + "\n").encode()


def _check_body(path: str, headers: dict[bytes, bytes], body: bytes) -> str | None:
    """Why the body breaks the contract, or None."""
    if path.endswith(("/classify", "/detect")):
        ctype = headers.get(b"content-type", b"").decode()
        if not (ctype.startswith("image/") or ctype == "application/octet-stream") or not body:
            return f"bad content type {ctype!r} or empty body"
        return None
    try:
        if b"inference-header-content-length" in headers:
            n = int(headers[b"inference-header-content-length"])
            req = json.loads(body[:n])
            tensor = req["inputs"][0]
            size = tensor["parameters"]["binary_data_size"]
            (length,) = struct.unpack("<I", body[n : n + 4])
            ok = size == len(body) - n == length + 4
        else:
            tensor = json.loads(body)["inputs"][0]
            ok = len(base64.b64decode(tensor["data"][0], validate=True)) > 0
        ok = ok and tensor["name"] == "image" and tensor["datatype"] == "BYTES"
    except (ValueError, KeyError, IndexError, TypeError, struct.error) as exc:
        return f"malformed infer request: {exc!r}"
    return None if ok else "inconsistent BYTES tensor"


class _Conn(asyncio.Protocol):
    def __init__(self, state: _State) -> None:
        self.state = state
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # one request at a time per connection (no pipelining)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = bytes(self.buf[:end]).split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get(b"content-length", b"0"))
        if len(self.buf) < end + 4 + length:
            return
        body = bytes(self.buf[end + 4 : end + 4 + length])
        del self.buf[: end + 4 + length]
        method, path = lines[0].split(b" ")[:2]
        self.busy = True
        self._handle(method.decode(), path.decode(), headers, body)

    def _handle(self, method: str, path: str, headers: dict[bytes, bytes], body: bytes) -> None:
        st, b = self.state, self.state.b
        path = path.split("?")[0]
        if method == "GET" and path == "/metrics" and b.metrics:
            return self._send(200, st.metrics_text(), "text/plain; version=0.0.4")
        if method == "GET" and path == "/v1/models":
            return self._send(200, b'{"models": [{"name": "m"}]}')
        parts = path.split("/")
        if method != "POST" or len(parts) < 5 or parts[2] != "models":
            return self._send(404, b'{"error": "not found"}')
        st.n += 1
        now = time.perf_counter()
        if st.first is None:
            st.first = now
        if b.validate and (why := _check_body(path, headers, body)) is not None:
            return self._send(400, json.dumps({"error": why}).encode())
        if b.error_every and st.n % b.error_every == 0:
            return self._send(503, b'{"error": "overloaded"}', extra="Retry-After: 1\r\n")
        delay = b.latency_ms / 1e3
        if b.slow_every and st.n % b.slow_every == 0:
            delay = b.slow_ms / 1e3
        if b.stall_period_s:
            phase = (now - st.first) % b.stall_period_s
            if phase >= b.stall_period_s - b.stall_s:
                delay += b.stall_period_s - phase
        model = parts[3]
        st.observe(model, "visionserve_queue_wait_seconds", delay * 0.4)
        st.observe(model, "visionserve_inference_seconds", delay * 0.6)
        st.observe(model, "visionserve_request_duration_seconds", delay)
        if st.n % b.batch_size == 0:
            st.observe(model, "visionserve_batch_size", float(b.batch_size))
        answer = json.dumps({"model": model, "version": "1", "predictions": [{"index": 1, "score": 1.0}]})
        if delay <= 0:
            return self._send(200, answer.encode())
        self._send_at(now + delay, answer.encode())
        return None

    def _send_at(self, when: float, body: bytes) -> None:
        # libuv timers run on a cached, millisecond clock and may fire early: re-arm until due
        left = when - time.perf_counter()
        if left > 0:
            asyncio.get_running_loop().call_later(left, self._send_at, when, body)
        else:
            self._send(200, body)

    def _send(self, status: int, body: bytes, ctype: str = "application/json", extra: str = "") -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n"
        )
        self.transport.write(head.encode() + body)
        self.busy = False
        if self.buf:
            self._next()


async def serve(behaviour: Behaviour, host: str = "127.0.0.1", port: int = 0) -> asyncio.AbstractServer:
    """Start the server on the running loop (port 0: a free one)."""
    state = _State(behaviour)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Conn(state), host, port, backlog=1024)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m visionserve.loadtest.testserver", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--slow-every", type=int, default=0)
    ap.add_argument("--slow-ms", type=float, default=0.0)
    ap.add_argument("--error-every", type=int, default=0)
    ap.add_argument("--stall-period-s", type=float, default=0.0)
    ap.add_argument("--stall-s", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--no-metrics", action="store_true")
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="exit after this long (bounded)")
    a = ap.parse_args(argv)
    b = Behaviour(
        a.latency_ms,
        a.slow_every,
        a.slow_ms,
        a.error_every,
        a.stall_period_s,
        a.stall_s,
        max(1, a.batch_size),
        not a.no_metrics,
        not a.no_validate,
    )

    async def run() -> None:
        server = await serve(b, a.host, a.port)
        port = server.sockets[0].getsockname()[1]
        print(f"listening on http://{a.host}:{port}", flush=True)
        await asyncio.sleep(a.max_seconds)
        server.close()

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:  # pragma: no cover
        asyncio.run(run())


if __name__ == "__main__":
    main()
