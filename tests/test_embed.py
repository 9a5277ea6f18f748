"""Embeddings and one-shot galleries over real HTTP, on the committed digits one-shot model (no training).

The model (examples/train_digits_oneshot.py) was trained on digits 0–4 and generated non-digit glyphs only;
the galleries here enrol one image each of 5–9, which it never saw.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, Server, start_server, stop_server

DATA = ROOT / "tests" / "data"
ONESHOT_REPO = DATA / "digits_oneshot_repo"
UNSEEN = DATA / "digits_oneshot" / "unseen"
MODEL = "digits_oneshot"


def unseen(digit: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted((UNSEEN / str(digit)).glob("*.png"))]


def make_repo(tmp: Path) -> Path:
    """digits_oneshot, a second embedding model (a copy) for the 409s, and the digits classifier."""
    repo = tmp / "repo"
    shutil.copytree(ONESHOT_REPO / MODEL, repo / MODEL)
    shutil.copytree(ONESHOT_REPO / MODEL, repo / "other_embed")
    manifest = repo / "other_embed" / "1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace(f'"name": "{MODEL}"', '"name": "other_embed"'))
    shutil.copytree(DATA / "digits_repo" / "digits", repo / "digits")
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tmp_path_factory.mktemp("embed"))


@pytest.fixture(scope="module")
def srv(repo: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("embed-server")
    s = start_server(repo, tmp, env={"VISIONSERVE_DATA_DIR": str(tmp / "data")})
    yield s
    stop_server(s)


def post(url: str, data: bytes, **params: object) -> httpx.Response:
    return httpx.post(url, content=data, params=params, headers={"Content-Type": "image/png"}, timeout=30)


def put(s: Server, gallery: str, item: str, data: bytes, **params: object) -> httpx.Response:
    return httpx.put(f"{s.url}/v1/galleries/{gallery}/items/{item}", content=data, params=params,
                     headers={"Content-Type": "image/png"}, timeout=30)


def enrol_unseen(s: Server, gallery: str, model: str = MODEL) -> None:
    for d in range(5, 10):
        r = put(s, gallery, f"ref{d}", unseen(d)[0], model=model, label=str(d))
        assert r.status_code == 201, r.text


# -- embed ---------------------------------------------------------------------------------------------------
def test_embed_returns_a_unit_vector_equal_to_the_oip_output(srv: Server) -> None:
    img = unseen(7)[0]
    r = post(f"{srv.url}/v1/models/{MODEL}/embed", img)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["dim"]) == (MODEL, "1", 64)
    vec = np.asarray(body["embedding"])
    assert vec.shape == (64,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    again = post(f"{srv.url}/v1/models/{MODEL}/versions/1/embed", img).json()
    np.testing.assert_allclose(again["embedding"], vec, atol=1e-6)
    oip = httpx.post(f"{srv.url}/v2/models/{MODEL}/infer", json={"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [2], "data": [base64.b64encode(img).decode()] * 2}]}).json()
    out = oip["outputs"][0]
    assert out["shape"] == [2, 64]
    np.testing.assert_allclose(np.asarray(out["data"]).reshape(2, 64)[1], vec, atol=1e-5)


def test_same_digit_is_closer_than_another_digit(srv: Server) -> None:
    def emb(data: bytes) -> np.ndarray:
        return np.asarray(post(f"{srv.url}/v1/models/{MODEL}/embed", data).json()["embedding"])

    a, b = (emb(x) for x in unseen(6)[:2])
    c = emb(unseen(9)[0])
    assert a @ b > a @ c


def test_embed_errors(srv: Server) -> None:
    assert post(f"{srv.url}/v1/models/nope/embed", unseen(5)[0]).status_code == 404
    assert post(f"{srv.url}/v1/models/{MODEL}/versions/7/embed", unseen(5)[0]).status_code == 404
    r = post(f"{srv.url}/v1/models/digits/embed", unseen(5)[0])  # a classifier
    assert r.status_code == 422 and "classify" in r.json()["error"]
    r = post(f"{srv.url}/v1/models/{MODEL}/classify", unseen(5)[0])  # an embedder on another task's route
    assert r.status_code == 422
    r = post(f"{srv.url}/v1/models/{MODEL}/embed", b"not an image")
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{srv.url}/v1/models/{MODEL}/embed", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


def test_embed_requests_are_counted_per_route(srv: Server) -> None:
    post(f"{srv.url}/v1/models/{MODEL}/embed", unseen(8)[0])
    metrics = httpx.get(f"{srv.url}/metrics").text
    assert f'visionserve_requests_total{{endpoint="embed",model="{MODEL}",outcome="success",version="1"}}' in metrics


# -- galleries -------------------------------------------------------------------------------------------------
def test_one_shot_identification_of_unseen_digits(srv: Server) -> None:
    enrol_unseen(srv, "digits")
    hits = total = 0
    for d in range(5, 10):
        for img in unseen(d)[1:21]:
            r = post(f"{srv.url}/v1/galleries/digits/identify", img, top_k=5)
            assert r.status_code == 200, r.text
            body = r.json()
            sims = [m["similarity"] for m in body["matches"]]
            assert len(sims) == 5 and sims == sorted(sims, reverse=True)
            assert body["label"] == body["matches"][0]["label"]
            hits += body["label"] == str(d)
            total += 1
    # chance is 0.2; the committed model's 5-way 1-shot accuracy on 5-9 is 84 % ± 7 % over random enrolments
    # (90 of these 100) — short of the 90 % on average (docs/embeddings.md); the floor was 0.6 for
    # the previous model (74 of 100)
    assert hits / total >= 0.8, f"{hits}/{total}"


def test_gallery_lifecycle(srv: Server) -> None:
    img5, img6 = unseen(5)[0], unseen(6)[0]
    r = put(srv, "life", "a", img5, model=MODEL, label="five")
    assert r.status_code == 201
    assert r.json() == {"gallery": "life", "item": "a", "label": "five", "model": MODEL, "version": "1"}
    assert put(srv, "life", "b", img6, label="six").status_code == 201  # the gallery's model by default
    r = put(srv, "life", "a", img6, label="six-too")
    assert r.status_code == 200  # replaced
    got = httpx.get(f"{srv.url}/v1/galleries/life").json()
    assert got == {"gallery": "life", "model": MODEL, "version": "1",
                   "items": [{"item": "a", "label": "six-too"}, {"item": "b", "label": "six"}]}
    listed = {g["gallery"]: g for g in httpx.get(f"{srv.url}/v1/galleries").json()["galleries"]}
    assert listed["life"]["items"] == 2
    # the same image as an enrolled one: similarity 1, so even a strict threshold names it
    r = post(f"{srv.url}/v1/galleries/life/identify", img6, threshold=0.999).json()
    assert r["label"] in ("six", "six-too") and r["matches"][0]["similarity"] > 0.999
    r = post(f"{srv.url}/v1/galleries/life/identify", img5, threshold=0.9999, top_k=1).json()
    assert r["label"] is None and len(r["matches"]) == 1  # below the threshold: unknown
    assert httpx.delete(f"{srv.url}/v1/galleries/life/items/a").status_code == 200
    assert [i["item"] for i in httpx.get(f"{srv.url}/v1/galleries/life").json()["items"]] == ["b"]
    assert httpx.delete(f"{srv.url}/v1/galleries/life/items/a").status_code == 404
    assert httpx.delete(f"{srv.url}/v1/galleries/life").status_code == 200
    assert httpx.get(f"{srv.url}/v1/galleries/life").status_code == 404
    assert "life" not in {g["gallery"] for g in httpx.get(f"{srv.url}/v1/galleries").json()["galleries"]}


def test_gallery_errors(srv: Server) -> None:
    img = unseen(5)[0]
    assert post(f"{srv.url}/v1/galleries/nope/identify", img).status_code == 404
    assert httpx.get(f"{srv.url}/v1/galleries/nope").status_code == 404
    assert httpx.delete(f"{srv.url}/v1/galleries/nope").status_code == 404
    assert httpx.delete(f"{srv.url}/v1/galleries/nope/items/x").status_code == 404
    r = put(srv, "errs", "x", img)  # a new gallery needs a model
    assert r.status_code == 422 and "model" in r.json()["error"]
    assert put(srv, "errs", "x", img, model="nope").status_code == 404
    assert put(srv, "errs", "x", img, model="digits").status_code == 422  # a classifier
    assert put(srv, "errs", "x", b"junk", model=MODEL).status_code == 400
    assert httpx.get(f"{srv.url}/v1/galleries/errs").status_code == 404  # nothing half-made
    assert put(srv, "errs", "x", img, model=MODEL).status_code == 201
    r = put(srv, "errs", "y", img, model="other_embed")
    assert r.status_code == 409 and "other_embed" in r.json()["error"]
    for params in ({"top_k": 0}, {"top_k": "many"}, {"threshold": 1.5}, {"threshold": "x"}):
        r = post(f"{srv.url}/v1/galleries/errs/identify", img, **params)
        assert r.status_code == 422, params
    assert put(srv, "-bad", "x", img, model=MODEL).status_code == 422
    assert put(srv, "errs", "bad%20name", img).status_code == 422
    assert post(f"{srv.url}/v1/galleries/errs/identify", b"junk").status_code == 400
    assert httpx.get(f"{srv.url}/v1/galleries/errs").json()["items"] == [{"item": "x", "label": "x"}]


def test_galleries_survive_a_restart(repo: Path, tmp_path: Path) -> None:
    env = {"VISIONSERVE_DATA_DIR": str(tmp_path / "data")}
    s = start_server(repo, tmp_path, env=env)
    try:
        enrol_unseen(s, "kept")
        before = post(f"{s.url}/v1/galleries/kept/identify", unseen(7)[3]).json()
    finally:
        assert stop_server(s) == 0
    s = start_server(repo, tmp_path, env=env)
    try:
        assert len(httpx.get(f"{s.url}/v1/galleries/kept").json()["items"]) == 5
        after = post(f"{s.url}/v1/galleries/kept/identify", unseen(7)[3]).json()
        assert after == before
    finally:
        stop_server(s)


def test_the_api_key_guards_embed_and_galleries(repo: Path, tmp_path: Path) -> None:
    s = start_server(repo, tmp_path, env={"VISIONSERVE_API_KEY": "sesame",
                                          "VISIONSERVE_DATA_DIR": str(tmp_path / "data")})
    try:
        img = unseen(5)[0]
        assert post(f"{s.url}/v1/models/{MODEL}/embed", img).status_code == 401
        assert put(s, "locked", "x", img, model=MODEL).status_code == 401
        assert httpx.get(f"{s.url}/v1/galleries").status_code == 401
        r = httpx.put(f"{s.url}/v1/galleries/locked/items/x", content=img, params={"model": MODEL},
                      headers={"Content-Type": "image/png", "X-API-Key": "sesame"})
        assert r.status_code == 201
        assert httpx.get(f"{s.url}/v1/galleries", headers={"X-API-Key": "sesame"}).json()["galleries"][0]["items"] == 1
    finally:
        stop_server(s)


names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12)
values = st.one_of(st.none(), st.text(max_size=8), st.integers(-10**9, 10**9).map(str),
                   st.sampled_from(["nan", "inf", "-inf", "1e309", "0", "0.5", "-1", "3"]))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(gallery=names, item=names, model=values, label=values, top_k=values, threshold=values,
       body=st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])))
def test_gallery_routes_never_answer_5xx(srv: Server, gallery: str, item: str, model: str | None,
                                         label: str | None, top_k: str | None, threshold: str | None,
                                         body: bytes) -> None:
    g, i = quote(gallery, safe=""), quote(item, safe="")
    with httpx.Client(base_url=srv.url, timeout=30, headers={"Content-Type": "image/png"}) as c:
        answers = [
            c.put(f"/v1/galleries/{g}/items/{i}", content=body,
                  params={k: v for k, v in {"model": model, "label": label}.items() if v is not None}),
            c.post(f"/v1/galleries/{g}/identify", content=body,
                   params={k: v for k, v in {"top_k": top_k, "threshold": threshold}.items() if v is not None}),
            c.get(f"/v1/galleries/{g}"),
            c.delete(f"/v1/galleries/{g}/items/{i}"),
            c.post(f"/v1/models/{g}/embed", content=body),
        ]
    for r in answers:
        assert r.status_code < 500, (r.request.url, r.status_code, r.text)
        assert r.status_code < 400 or "error" in r.json()
