"""The search behind ``identify``: an 8-bit scan for candidates, then exact cosine on the candidates.

A gallery of 10 000 × 1280 float32 vectors is 51 MB, and a brute-force ``vectors @ query`` reads all of it for
every query: memory bandwidth, not arithmetic, sets its cost, and on a busy 2-core machine it took 15-19 ms
(docs/embeddings.md). Scalar quantisation (what FAISS calls SQ8) reads a quarter of the bytes: every stored
vector is kept as int8 codes with its own scale (symmetric, per item), the query is quantised to uint8 on the
fly, and onnxruntime's ``MatMulInteger`` (MLAS's u8s8 kernels: VNNI where the CPU has it) scores every item at
once. The best ``candidates`` of those approximate scores are then re-scored exactly from the float32
vectors, so the similarities returned, and the ``threshold`` decision made on them, are the exact ones; only
an item whose approximate score falls outside the candidate list could be missed (scores are within ~1e-3
of exact at 1280 dims, and the list is ≥ 64 long; benchmarks/gallery_search.py measures recall).

onnxruntime is already the serving runtime, so this needs no new dependency (FAISS would be one). Each
index is a small session whose ``codes`` are a constant initializer handed over from numpy memory
(``SessionOptions.add_initializer``): a constant lets MLAS pack them once, when the index is built, instead of
on every query (measured: 0.8 ms against 7 ms a query at 10 000 × 1280 on one thread). The graph itself is a
394-byte template kept below as text, so the serving image needs no ``onnx`` package; tests/test_gallery_index.py
rebuilds it with ``onnx`` and checks it. One intra-op thread, no spinning: the scan runs on the request's
thread beside the inference workers without fanning out threads of its own.
"""

from __future__ import annotations

import base64

import numpy as np

EXACT_ITEMS = 2048  # up to this many items the float32 scan costs ~0.3 ms: no index
MIN_CANDIDATES = 64  # exact re-scoring of at least this many approximate best
TAIL_ITEMS = 512  # items enrolled since the index was built, scored exactly (≤ ~0.5 ms at 10 000 × 1280:
#                   benchmarks/gallery_enrol.py)

# query [1, D] → DynamicQuantizeLinear → MatMulInteger(·, codes [D, N] int8) → Cast → × query scale
# → × scales [N] → TopK(k) → (best, top). ``codes`` and ``scales`` are 1-element placeholders, replaced per index.
TEMPLATE = base64.b64decode(
    "CAgSC3Zpc2lvbnNlcnZlOvICCjEKBXF1ZXJ5EgJxOBIGcXNjYWxlEgVxemVybyIVRHluYW1pY1F1YW50aXplTGluZWFyCiYKAnE4"
    "CgVjb2RlcwoFcXplcm8SA2FjYyINTWF0TXVsSW50ZWdlcgocCgNhY2MSBGFjY2YiBENhc3QqCQoCdG8YAaABAgocCgRhY2NmCgZx"
    "c2NhbGUSB3BhcnRpYWwiA011bAoeCgdwYXJ0aWFsCgZzY2FsZXMSBnNjb3JlcyIDTXVsCikKBnNjb3JlcwoBaxIEYmVzdBIDdG9w"
    "IgRUb3BLKgsKBGF4aXMYAaABAhIMZ2FsbGVyeV9zY2FuKhAIAQgBEANCBWNvZGVzSgEAKhIIARABQgZzY2FsZXNKBAAAgD9aGAoF"
    "cXVlcnkSDwoNCAESCQoCCAEKAxIBRFoPCgFrEgoKCAgHEgQKAggBYhcKBGJlc3QSDwoNCAESCQoCCAEKAxIBS2IWCgN0b3ASDwoN"
    "CAcSCQoCCAEKAxIBS0IECgAQEQ==")


class CodeIndex:
    """int8 codes of unit vectors ``[N, D]``: ``candidates(query, c)`` → indices of the ``c`` best by
    approximate cosine (unordered). Immutable once built; safe to share between threads."""

    def __init__(self, vectors: np.ndarray) -> None:
        import onnxruntime as ort

        vectors = np.asarray(vectors, np.float32)
        peak = np.abs(vectors).max(axis=1)
        self.scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        # [D, N]: the layout MatMulInteger wants for B (query [1, D] × codes [D, N])
        self.codes = np.ascontiguousarray(np.rint(vectors / self.scales[:, None]).astype(np.int8).T)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # no graph rewrites: they would see the placeholders (a Mul by ones is removed) rather than the data
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # the session borrows these OrtValues (and they borrow the arrays): they must outlive it
        self._values = (ort.OrtValue.ortvalue_from_numpy(self.codes), ort.OrtValue.ortvalue_from_numpy(self.scales))
        options.add_initializer("codes", self._values[0])
        options.add_initializer("scales", self._values[1])
        self._session = ort.InferenceSession(TEMPLATE, options, providers=["CPUExecutionProvider"])

    def __len__(self) -> int:
        return int(self.codes.shape[1])

    def candidates(self, query: np.ndarray, c: int) -> np.ndarray:
        c = max(1, min(c, len(self)))
        _, top = self._session.run(None, {"query": np.asarray(query, np.float32).reshape(1, -1),
                                          "k": np.array([c], np.int64)})
        return top[0]  # type: ignore[no-any-return]
