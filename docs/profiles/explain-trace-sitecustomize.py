# Profiling aid for docs/profiles/explain-live-p99.md, not product code: put this directory (renamed to
# sitecustomize.py) on PYTHONPATH of a `python -m visionserve.service serve` with VS_TRACE=out.json to record events.
"""Trace hooks for the visionserve server (profiling only; loaded when VS_TRACE names an output file)."""
import os

if os.environ.get("VS_TRACE"):
    import asyncio
    import atexit
    import json
    import threading
    import time
    EV = []
    def ev(kind, **kw):
        EV.append((kind, time.monotonic(), threading.get_native_id(), kw))
    def dump():
        with open(os.environ["VS_TRACE"], "w") as f:
            json.dump(EV, f)
    atexit.register(dump)
    import gc
    _gc = {}
    def _gccb(phase, info):
        tid = threading.get_native_id()
        if phase == "start":
            _gc[tid] = time.monotonic()
        else:
            t0 = _gc.pop(tid, None)
            if t0 is not None:
                ev("gc", t0=t0, gen=info["generation"], collected=info["collected"],
                   thread=threading.current_thread().name)
    gc.callbacks.append(_gccb)
    def _install():
        from visionserve.service import batcher as B
        from visionserve.service import explain as E
        from visionserve.service import explainer as X
        orig_submit = B.Batcher.submit
        async def submit(self, item, deadline=None, prepare=None, *, background=False):
            if background:
                return await orig_submit(self, item, deadline, prepare, background=True)
            t0 = time.monotonic()
            try:
                return await orig_submit(self, item, deadline, prepare)
            finally:
                ev("live", t0=t0)
        B.Batcher.submit = submit
        orig_exec = B.Batcher._execute
        def _execute(self, runner, live, options=None):
            t0 = time.monotonic()
            try:
                return orig_exec(self, runner, live, options)
            finally:
                ev("exec", t0=t0, n=len(live), bg=live[0].background, solo=runner is self.solo,
                   term=bool(options is not None and options.terminate))
        B.Batcher._execute = _execute
        orig_preempt = B.Batcher._preempt
        def _preempt(self):
            ev("preempt", n=len(self._background_runs))
            return orig_preempt(self)
        B.Batcher._preempt = _preempt
        for name in ("saliency",):
            for cls in (E.Rise, E.Occlusion):
                o = getattr(cls, name)
                def w(self, *a, _o=o, **k):
                    t0 = time.monotonic()
                    try:
                        return _o(self, *a, **k)
                    finally:
                        ev("saliency", t0=t0)
                setattr(cls, name, w)
        orig_explain = X.explain
        async def explain(*a, **k):
            t0 = time.monotonic()
            try:
                return await orig_explain(*a, **k)
            finally:
                ev("explain", t0=t0)
        X.explain = explain
        async def lag():
            while True:
                t0 = time.monotonic()
                await asyncio.sleep(0.001)
                d = time.monotonic() - t0
                if d > 0.003:
                    ev("lag", t0=t0, d=d)
        orig_start = B.Batcher.start
        def start(self):
            asyncio.get_running_loop().create_task(lag())
            return orig_start(self)
        B.Batcher.start = start
    import importlib.abc
    import sys
    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "visionserve.service.http.explain":
                sys.meta_path.remove(self)
                _install()
                return None
            return None
    sys.meta_path.insert(0, Hook())
