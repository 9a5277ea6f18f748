"""``visionserve tune``: find the serving settings that give the most throughput under a p99 target, here.

For each point of the grid instances × intra-op threads × preferred batch × batch delay it starts a real
``visionserve serve`` (this Python, a repository holding only the model tuned, the candidate settings in a
config file), runs closed-loop concurrency 1, 2, 4, ... (``max_steps`` levels, every one of them: on a shared
machine a noisy step must not end a sweep early) with the load generator, and keeps the best level that met
the p99 target. The winner is written as a config
file ``serve --config`` reads (its ``models.<name>`` section), beside ``tune.json``, ``report.md`` and a plot.

Every server is stopped before the next starts; every sweep is bounded (steps, windows, seconds).
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import LoadConfig
from .server_process import start, stop
from .sweep import SweepSpec, run_sweep

KNOBS = ("instances", "intra_op_threads", "preferred_batch_size", "max_batch_delay_ms")


@dataclass(frozen=True)
class Candidate:
    instances: int
    intra_op_threads: int
    preferred_batch_size: int
    max_batch_delay_ms: float

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in KNOBS}

    @property
    def label(self) -> str:
        return (f"{self.instances} inst x {self.intra_op_threads} thr, batch <= {self.preferred_batch_size}, "
                f"delay {self.max_batch_delay_ms:g} ms")


@dataclass
class Outcome:
    candidate: Candidate
    best_rps: float | None  # most throughput with p99 within the target (None: no level met it)
    best_p99_ms: float | None
    best_concurrency: int | None
    curve: list[dict[str, float]]  # every level: concurrency, rps, p99_ms
    error: str | None = None


def grid(instances: list[int], threads: list[int], batches: list[int], delays: list[float], cpus: int
         ) -> list[Candidate]:
    """Every combination, less those that ask for more than twice the usable CPUs in threads."""
    out = [Candidate(i, t, b, d) for i, t, b, d in itertools.product(instances, threads, batches, delays)
           if i * t <= 2 * cpus]
    if not out:
        raise ValueError("the grid is empty (instances x threads must be at most twice the usable CPUs)")
    return out


def evaluate(candidate: Candidate, *, model_dir: Path, model: str, images: list[bytes], slo_p99_ms: float,
             duration: float, max_steps: int, workdir: Path) -> Outcome:
    """Serve with this candidate, run concurrency 1, 2, 4, ... and keep the best level within the target."""
    repo = workdir / "repo"
    if not (repo / model).exists():
        (repo / model).mkdir(parents=True)
        for version in model_dir.iterdir():
            if version.is_dir() and version.name.isdigit():
                (repo / model / version.name).symlink_to(version.resolve())
    config = workdir / "candidate.yaml"
    config.write_text(yaml.safe_dump({"models": {model: candidate.settings()}}))
    try:
        server = start(repo, workdir, args=["--config", str(config), "--log-level", "warning"], clean_env=True)
    except RuntimeError as e:  # a candidate the server refuses, or one that never gets ready
        return Outcome(candidate, None, None, None, [], error=str(e).splitlines()[0][:300])
    url = server.url
    try:
        base = LoadConfig(url=url, model=model, kind="classify", images=images, concurrency=1, duration=duration,
                          warmup=1.0, metrics=False)
        levels = [float(2**k) for k in range(max_steps)]
        sweep = run_sweep(base, SweepSpec("closed", levels, 1.0), slo_p99_ms=slo_p99_ms, max_steps=max_steps,
                          max_windows=max(3, int(duration)))
    except Exception as e:  # a load run that fails on this candidate
        return Outcome(candidate, None, None, None, [], error=str(e).splitlines()[0][:300])
    finally:
        stop(server)
    curve = [{"concurrency": s.load, "rps": round(s.throughput_rps, 2), "p99_ms": s.latency_ms["p99"] or 0.0}
             for s in sweep.steps]
    best = sweep.best
    if best is None:
        return Outcome(candidate, None, None, None, curve)
    return Outcome(candidate, best.throughput_rps, best.latency_ms["p99"], int(best.load), curve)


def choose(outcomes: list[Outcome]) -> Outcome | None:
    """Most throughput within the target; a tie within 3 % goes to the lower p99."""
    ok = [o for o in outcomes if o.best_rps is not None]
    if not ok:
        return None
    top = max(o.best_rps for o in ok)  # type: ignore[type-var]
    near = [o for o in ok if o.best_rps >= 0.97 * top]  # type: ignore[operator]
    return min(near, key=lambda o: o.best_p99_ms or 0.0)


def write_outputs(out: Path, report_dir: Path, model: str, slo_p99_ms: float, outcomes: list[Outcome],
                  winner: Outcome | None, machine: dict[str, Any]) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    data = {"model": model, "slo_p99_ms": slo_p99_ms, "machine": machine,
            "winner": None if winner is None else asdict(winner),
            "outcomes": [asdict(o) for o in outcomes]}
    (report_dir / "tune.json").write_text(json.dumps(data, indent=2))
    if winner is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        header = (f"# visionserve tune: {model} on {machine['cpus']} usable CPUs ({machine['cpu_model']}), "
                  f"p99 <= {slo_p99_ms:g} ms:\n# {winner.best_rps:.1f} req/s at concurrency "
                  f"{winner.best_concurrency}, p99 {winner.best_p99_ms:.1f} ms. Use: visionserve serve --config "
                  f"{out.name}\n")
        out.write_text(header + yaml.safe_dump({"models": {model: winner.candidate.settings()}}, sort_keys=False))
    plot = report_dir / "tune.png"
    _plot(outcomes, winner, slo_p99_ms, plot)
    lines = [f"# visionserve tune: {model}", "",
             f"{machine['cpus']} usable CPUs ({machine['cpu_model']}); target p99 <= {slo_p99_ms:g} ms; "
             f"each point is the best closed-loop level that met it.", "",
             "| settings | best req/s within target | at concurrency | p99 (ms) |", "| --- | ---: | ---: | ---: |"]
    for o in sorted(outcomes, key=lambda o: -(o.best_rps or 0)):
        mark = " **(chosen)**" if o is winner else ""
        if o.best_rps is None:
            lines.append(f"| {o.candidate.label}{mark} | — ({o.error or 'no level met the target'}) | | |")
        else:
            lines.append(f"| {o.candidate.label}{mark} | {o.best_rps:.1f} | {o.best_concurrency} | "
                         f"{o.best_p99_ms:.1f} |")
    lines += ["", f"![throughput against p99, every candidate]({plot.name})", ""]
    if winner is not None:
        lines += [f"Written: `{out}` — `visionserve serve --config {out}`.", ""]
    (report_dir / "report.md").write_text("\n".join(lines))


def _plot(outcomes: list[Outcome], winner: Outcome | None, slo: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5.5))
    ax.set_prop_cycle(color=[plt.get_cmap("tab20")(i % 20) for i in range(len(outcomes))])
    for o in outcomes:
        if not o.curve:
            continue
        xs = [p["rps"] for p in o.curve]
        ys = [p["p99_ms"] for p in o.curve]
        chosen = o is winner
        ax.plot(xs, ys, marker="o", lw=2.5 if chosen else 1, alpha=1 if chosen else 0.45,
                label=o.candidate.label + (" (chosen)" if chosen else ""), zorder=3 if chosen else 2)
    ax.axhline(slo, color="red", ls="--", lw=1, label=f"p99 target {slo:g} ms")
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.set_title("visionserve tune: each line sweeps concurrency 1, 2, 4, ... for one setting")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tune(model_dir: Path, model: str, images: list[bytes], candidates: list[Candidate], *, slo_p99_ms: float,
         duration: float, max_steps: int, out: Path, report_dir: Path,
         progress: Callable[[int, int, Outcome], None] | None = None) -> tuple[list[Outcome], Outcome | None]:
    from visionserve.service.cpus import available_cpus

    outcomes = []
    with tempfile.TemporaryDirectory(prefix="visionserve-tune-") as tmp:
        for i, cand in enumerate(candidates):
            o = evaluate(cand, model_dir=model_dir, model=model, images=images, slo_p99_ms=slo_p99_ms,
                         duration=duration, max_steps=max_steps, workdir=Path(tmp))
            outcomes.append(o)
            if progress is not None:
                progress(i + 1, len(candidates), o)
    winner = choose(outcomes)
    machine = {"cpus": available_cpus(), "cpu_model": _cpu_model()}
    write_outputs(out, report_dir, model, slo_p99_ms, outcomes, winner, machine)
    return outcomes, winner


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
