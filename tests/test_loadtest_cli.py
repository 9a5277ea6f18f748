"""``visionserve loadtest`` through the real root app: runs, sweeps, compare, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_loadtest_support import JPEG, test_server
from visionserve.service.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def server() -> object:
    with test_server(latency_ms=2, error_every=50, batch_size=2) as url:
        yield url


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img.jpg"
    path.write_bytes(JPEG)
    return path


def invoke(*args: object) -> object:
    return runner.invoke(app, ["loadtest", *map(str, args)])


def test_run_then_compare(server: str, image: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--model", "m", "--image", image, "--duration", "0.6", "--warmup", "0.1", "-q"]
    res = invoke(server, *common, "--concurrency", "2", "--json", a)
    assert res.exit_code == 0, res.output
    assert "latency p99" in res.output and "server batch size mean" in res.output
    res = invoke(server, *common, "--rate", "50", "--kind", "infer", "--json", b, "--report", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    data = json.loads(b.read_text())
    assert data["mode"] == "open" and data["config"]["kind"] == "infer" and data["ok"] > 0
    assert data["server"]["batch_size_mean"] == pytest.approx(2.0)
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "latency_distribution.png").exists()

    res = invoke("compare", a, b)
    assert res.exit_code == 0, res.output
    assert "throughput req/s" in res.output and "latency p99 ms" in res.output


def test_model_is_discovered_when_not_given(server: str, image: Path) -> None:
    res = invoke(server, "--image", image, "--requests", "20", "--warmup", "0", "-q")
    assert res.exit_code == 0, res.output
    assert "model m" in res.output


def test_sweep_from_the_command_line(server: str, image: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    res = invoke(
        server, "-m", "m", "--image", image, "--sweep", "1,2", "--window", "0.25", "--max-windows", "4",
        "--warmup", "0.1", "--slo-p99-ms", "1000", "--max-error-rate", "0.05", "--json", out, "-q",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["kind"] == "sweep" and [s["load"] for s in data["steps"]] == [1, 2]
    assert data["best"] is not None and "highest throughput meeting the SLO" in res.output


def test_slo_breach_on_a_single_run_exits_1(server: str, image: Path) -> None:
    res = invoke(
        server, "-m", "m", "--image", image, "--requests", "20", "--warmup", "0", "-q", "--slo-p99-ms", "0.001"
    )
    assert res.exit_code == 1
    assert "above --slo-p99-ms" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "2", "--rate", "5"], "not both"),
        (["--rate", "-5"], "--rate must be a positive"),
        (["--kind", "segment"], "--kind must be one of"),
        (["--sweep", "1,x"], "--sweep"),
        (["--sweep", "1,2", "--requests", "5"], "--requests does not apply"),
        (["--header", "no-colon"], "--header"),
        (["--duration", "-1"], "--duration"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(image: Path, args: list[str], message: str) -> None:
    res = invoke("http://127.0.0.1:9", "-m", "m", "--image", image, *args)
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_missing_image_and_bad_url_are_refused(image: Path) -> None:
    res = invoke("http://127.0.0.1:9", "-m", "m")
    assert res.exit_code == 2 and "--image" in res.output
    res = invoke("localhost:8000", "-m", "m", "--image", image)
    assert res.exit_code == 2 and "URL must look like" in res.output


def test_nothing_listening_exits_1(image: Path) -> None:
    with test_server() as url:
        pass
    res = invoke(url, "-m", "m", "--image", image, "--duration", "1")
    assert res.exit_code == 1 and "cannot connect" in res.output


def test_compare_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text('{"hello": 1}')
    res = invoke("compare", junk, tmp_path / "missing.json")
    assert res.exit_code == 2 and "not a loadtest JSON file" in res.output
    res = invoke("compare", tmp_path / "missing.json", junk)
    assert res.exit_code == 2 and "no such file" in res.output


def test_help_shows_the_run_options_and_compare() -> None:
    res = invoke("--help")
    assert res.exit_code == 0
    assert "--concurrency" in res.output and "compare" in res.output
