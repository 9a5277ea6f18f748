"""An independent naive server, the baseline a user would write in an afternoon: FastAPI + uvicorn, one ONNX
Runtime session using every core, one inference per request in FastAPI's thread pool, no batching.

It imports nothing from visionserve: it reads the model's manifest.json only for the preprocessing numbers,
and preprocesses as torchvision does (Pillow decode, shorter side to the crop size, centre crop, normalise).

    python benchmarks/naive_server.py MODEL_DIR --port 8001
    curl --data-binary @examples/images/cat.jpg http://127.0.0.1:8001/classify
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool


def build_app(model_dir: Path) -> FastAPI:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    pre = manifest["preprocess"]
    _, _, height, width = manifest["input"]["shape"]
    mean = np.array(pre["mean"], np.float32)
    std = np.array(pre["std"], np.float32)
    labels = manifest.get("labels", [])
    session = ort.InferenceSession(str(model_dir / manifest["model_file"]), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def preprocess(data: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        size = pre.get("resize") or min(height, width)
        w, h = img.size
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = round((nw - width) / 2), round((nh - height) / 2)
        img = img.crop((left, top, left + width, top + height))
        x = (np.asarray(img, np.float32) * pre["scale"] - mean) / std
        return x.transpose(2, 0, 1)[None]

    def classify(data: bytes) -> dict:
        logits = session.run(None, {input_name: preprocess(data)})[0][0]
        e = np.exp(logits - logits.max())
        p = e / e.sum()
        top = np.argsort(-p)[:5]
        return {"predictions": [{"index": int(i), "label": labels[i] if i < len(labels) else str(i),
                                 "score": float(p[i])} for i in top]}

    app = FastAPI()

    @app.post("/classify")
    async def classify_route(request: Request) -> dict:
        return await run_in_threadpool(classify, await request.body())  # one inference per request

    @app.get("/ready")
    def ready() -> dict:
        return {"ready": True}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    args = ap.parse_args()
    uvicorn.run(build_app(args.model_dir), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
