"""``visionserve explain``: ask a running server why it answered, and save the heat map as a PNG."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Annotated

import typer

from .cli_util import fail

Opt = typer.Option


def explain(
    image: Annotated[Path, typer.Argument(help="the image to explain")],
    model: Annotated[str, Opt("--model", "-m", help="served model name")],
    url: Annotated[str, Opt(help="the server's base URL")] = "http://127.0.0.1:8000",
    method: Annotated[str, Opt(help="occlusion or rise")] = "occlusion",
    target: Annotated[int | None, Opt(help="class index (default: the top-1 class)")] = None,
    box: Annotated[str | None, Opt(help="detectors: x1,y1,x2,y2 in image pixels (default: the best detection)")
                   ] = None,
    masks: Annotated[int | None, Opt(help="RISE: number of masks")] = None,
    seed: Annotated[int, Opt(help="RISE: random seed")] = 0,
    out: Annotated[Path | None, Opt("--out", "-o", help="PNG to write (default: IMAGE.explain.png)")] = None,
    api_key: Annotated[str | None, Opt(envvar="VISIONSERVE_API_KEY", help="the server's API key, if it has one")
                       ] = None,
    timeout: Annotated[float, Opt(help="seconds to wait for the answer")] = 120.0,
) -> None:
    """Explain a served model's answer on IMAGE and write the original picture with a heat map over it."""
    if not image.is_file():
        fail(f"image not found: {image}")
    params: dict[str, str | int] = {"method": method, "format": "png", "seed": seed}
    for name, value in (("target", target), ("box", box), ("masks", masks)):
        if value is not None:
            params[name] = value
    endpoint = f"{url.rstrip('/')}/v1/models/{urllib.parse.quote(model)}/explain?{urllib.parse.urlencode(params)}"
    headers = {"Content-Type": "application/octet-stream"}
    if api_key:
        headers["X-API-Key"] = api_key
    request = urllib.request.Request(endpoint, data=image.read_bytes(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            png, info = response.read(), response.headers
    except urllib.error.HTTPError as e:
        fail(f"{e.code}: {_error_text(e.read())}")
    except (urllib.error.URLError, OSError) as e:
        fail(f"cannot reach {url}: {getattr(e, 'reason', e)}")
    out = out or image.with_name(f"{image.stem}.explain.png")
    out.write_bytes(png)
    typer.echo(f"{out}: {method} saliency of {info.get('X-Explain-Target-Label')} "
               f"(class {info.get('X-Explain-Target-Index')}, score {info.get('X-Explain-Target-Score')}), "
               f"{info.get('X-Explain-Masks')} masked images")


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:500]
