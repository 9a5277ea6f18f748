"""Shapes detector: fp32 vs int8 (mAP and throughput at batch 8), and where NMS should run.

    python benchmarks/detect.py                      # ≈ 20 s on 2 cores
    python benchmarks/detect.py --images 200 --runs 30 --reduce-range

1. Builds ``shapes_detector`` (convert/detect_default.py) in a temporary repository.
2. int8: ``onnxruntime.quantization.quantize_static``, QDQ, per-channel weights, calibrated on *val* images
   letterboxed by the server's Preprocessor. The box-regression convolution and the decoding after it stay
   fp32 (boxes are pixel coordinates), and so does the 3-channel first convolution (int8 is slower there);
   see ``float_nodes`` in quantize/detect.py (``visionserve quantize`` uses the same). Guard: mAP@0.5
   may drop at most ``--max-drop`` points.
3. Throughput: ONNX Runtime at batch 8, fp32 and int8 runs interleaved, medians; plus the numpy decode.
4. NMS placement: the same model with ONNX ``NonMaxSuppression`` appended (batched, in the graph) against
   server-side numpy NMS per image, both including everything needed to produce the answers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visionserve.convert.detect_default import build_default_detector  # noqa: E402
from visionserve.convert.shapes.data import split, write_coco  # noqa: E402
from visionserve.quantize.detect import float_nodes  # noqa: E402  (shared with `visionserve quantize`)
from visionserve.quantize.evaluate_detect import evaluate_detection  # noqa: E402
from visionserve.service.detection import decode, finish  # noqa: E402
from visionserve.service.imaging import Preprocessor  # noqa: E402
from visionserve.service.repository import ModelEntry  # noqa: E402


def quantize_int8(entry: ModelEntry, out: Path, calibration: list[np.ndarray], *, reduce_range: bool,
                  per_channel: bool = True) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{entry.manifest.input.name: t[None]} for t in calibration])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(entry.model_path), str(pre), skip_symbolic_shape=True)
    model = onnx.load(str(pre))
    exclude = float_nodes(model)
    quantize_static(
        str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
    )
    return out


def session(path: Path, threads: int):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def with_graph_nms(src: Path, dst: Path, iou: float, score: float, max_per_class: int) -> Path:
    """The visionserve-layout model plus ONNX NonMaxSuppression over the whole batch."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(src))
    g = m.graph
    g.node.extend([
        helper.make_node("Transpose", ["scores"], ["scores_t"], perm=[0, 2, 1]),
        helper.make_node("NonMaxSuppression", ["boxes", "scores_t", "nms_max", "nms_iou", "nms_score"],
                         ["selected"], center_point_box=0),
    ])
    g.initializer.extend([
        helper.make_tensor("nms_max", TensorProto.INT64, [1], [max_per_class]),
        helper.make_tensor("nms_iou", TensorProto.FLOAT, [1], [iou]),
        helper.make_tensor("nms_score", TensorProto.FLOAT, [1], [score]),
    ])
    g.output.append(helper.make_tensor_value_info("selected", TensorProto.INT64, [-1, 3]))
    onnx.save(m, str(dst))
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="test images for mAP")
    p.add_argument("--calibration", type=int, default=64, help="val images for int8 calibration")
    p.add_argument("--runs", type=int, default=30, help="timed batches per model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads (1: steadiest on a shared machine)")
    p.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=True,
                   help="7-bit weights (avoids vpmaddubsw saturation on AVX2 without VNNI)")
    p.add_argument("--max-drop", type=float, default=1.0, help="largest mAP@0.5 drop allowed, in points")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        entry = build_default_detector(tmp_path / "repo")
        m = entry.manifest
        prep = Preprocessor(m.input, m.preprocess, draft=False)
        write_coco(split("test", args.images), tmp_path / "test" / "images", tmp_path / "test" / "ann.json")
        calib = [prep.from_image(s.image)[0] for s in split("val", args.calibration)]
        t = time.perf_counter()
        int8 = quantize_int8(entry, tmp_path / "int8.onnx", calib, reduce_range=args.reduce_range)
        q_s = time.perf_counter() - t
        fp32 = entry.model_path

        maps = {}
        for label, path in (("fp32", fp32), ("int8", int8)):
            maps[label] = evaluate_detection(entry, tmp_path / "test" / "ann.json", tmp_path / "test" / "images",
                                             onnx_path=path, threads=args.threads)

        # throughput at batch 8, interleaved so both see the same machine load
        batch = np.stack(calib[: args.batch] * (args.batch // len(calib[: args.batch]) or 1))[: args.batch]
        sessions = {"fp32": session(fp32, args.threads), "int8": session(int8, args.threads)}
        nms_path = with_graph_nms(fp32, tmp_path / "nms.onnx", 0.45, 0.25, 100)
        sessions["fp32+graph NMS"] = session(nms_path, args.threads)
        name = m.input.name
        for s in sessions.values():
            for _ in range(3):
                s.run(None, {name: batch})
        geo = prep.from_image(split("test", 1)[0].image)[1]
        times: dict[str, list[float]] = {k: [] for k in (*sessions, "numpy decode x8", "fp32 + numpy NMS")}
        for _ in range(args.runs):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                outs = s.run(None, {name: batch})
                dt = time.perf_counter() - t0
                times[k].append(dt)
                if k == "fp32":
                    t1 = time.perf_counter()
                    for i in range(args.batch):
                        decode(m, {"boxes": outs[0][i], "scores": outs[1][i]}, geo, 0.25, 0.45, 100)
                    times["numpy decode x8"].append(time.perf_counter() - t1)
                    times["fp32 + numpy NMS"].append(dt + times["numpy decode x8"][-1])
                if k == "fp32+graph NMS":  # the same answers (dicts in original pixels), without numpy NMS
                    t1 = time.perf_counter()
                    sel = outs[2]
                    for i in range(args.batch):
                        rows = sel[sel[:, 0] == i]
                        finish(outs[0][i][rows[:, 2]], outs[1][i][rows[:, 2], rows[:, 1]], rows[:, 1], geo,
                               iou_threshold=0.45, max_detections=100, labels=m.labels, apply_nms=False)
                    times[k][-1] += time.perf_counter() - t1

    med = {k: statistics.median(v) for k, v in times.items()}
    drop = (maps["fp32"]["mAP@0.5"] - maps["int8"]["mAP@0.5"]) * 100
    print(f"\nshapes_detector, {args.images} test images, batch {args.batch}, {args.threads} threads, "
          f"{args.runs} interleaved runs (medians); int8 quantised in {q_s:.0f} s "
          f"(QDQ u8/s8, per-channel, reduce_range={args.reduce_range}; box regression, decoding and the "
          f"first conv in fp32)\n")
    print(f"| model | mAP@0.5 | mAP@[.5:.95] | batch-{args.batch} latency ms | images/s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k in ("fp32", "int8"):
        print(f"| {k} | {maps[k]['mAP@0.5']:.3f} | {maps[k]['mAP@[.5:.95]']:.3f} | {med[k] * 1e3:.1f} | "
              f"{args.batch / med[k]:.0f} | {med['fp32'] / med[k]:.2f}x |")
    print(f"\nint8 guard: mAP@0.5 drop {drop:.2f} pt (allowed {args.max_drop}) → "
          f"{'PASS' if drop <= args.max_drop else 'FAIL'}\n")
    print("| NMS placement (fp32, batch 8, answers for every image) | ms |")
    print("| --- | --- |")
    print(f"| server: ORT + numpy decode/NMS per image | {med['fp32 + numpy NMS'] * 1e3:.1f} "
          f"(decode {med['numpy decode x8'] * 1e3:.2f} for 8 images) |")
    print(f"| in graph: ORT with NonMaxSuppression + gather | {med['fp32+graph NMS'] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
