"""How much collective (all-to-all) time a profiled run hides behind compute: the run-time side of hlo_check.

`hlo_check` reads the schedule XLA chose; this reads what the GPU did. From a `jax.profiler` perfetto trace
(`create_perfetto_trace=True`) it takes every kernel on each device's streams and measures, per step, the
device time of collective kernels (NCCL and friends), of compute kernels, and the part of the collective time
during which a compute kernel runs on another stream of the same device: the overlap the ScMoE layer is built
for. Run it on the step with `moe.overlap=False` for the baseline (experiments/bench_ep.py does both).

    python -m lcflash.parallel.trace_overlap perfetto_trace.json.gz [--steps 2]
"""

from __future__ import annotations

import bisect
import collections
import re
from typing import Iterable, NamedTuple

# Generous on purpose: NCCL kernels (ncclDevKernel_SendRecv is NCCL's all-to-all), XLA's own collective kernels
# and peer-to-peer copies all count as communication ('ragged_dot' does not). The summary lists every name it
# matched.
COLLECTIVE_RE = re.compile(
    r"nccl|all[-_ ]?2[-_ ]?all|all[-_ ]?to[-_ ]?all|all[-_ ]?reduce|all[-_ ]?gather|reduce[-_ ]?scatter|"
    r"collective[-_ ]?permute|send[-_ ]?recv|ragged[-_ ]?all|p2p|peer", re.IGNORECASE)
# Copies and fills between host and device or within one device: neither communication nor compute.
MEMORY_RE = re.compile(r"^\s*mem(cpy|set)|^\s*\[?cuda_?mem(cpy|set)", re.IGNORECASE)


class Event(NamedTuple):
    name: str
    start: float     # microseconds
    dur: float
    stream: object   # anything that tells the streams of one device apart


def classify(name: str) -> str:
    """'collective', 'memory' or 'compute'."""
    if COLLECTIVE_RE.search(name):
        return "collective"
    if MEMORY_RE.search(name):
        return "memory"
    return "compute"


def merge_intervals(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint union of [start, end) intervals."""
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def covered(start: float, end: float, merged: list[tuple[float, float]], starts: list[float]) -> float:
    """Length of [start, end) covered by `merged` (disjoint, sorted; `starts` its start points)."""
    total = 0.0
    i = max(bisect.bisect_right(starts, start) - 1, 0)
    while i < len(merged) and merged[i][0] < end:
        total += max(0.0, min(end, merged[i][1]) - max(start, merged[i][0]))
        i += 1
    return total


def overlap_summary(events: Iterable[tuple], steps: int = 1) -> dict:
    """Summary of one device's kernels, `events` = (name, start_us, dur_us, stream), over `steps` steps.

    collective_us / compute_us / memory_us: summed kernel time per step; collective_overlapped_us: per step, the
    part of each collective kernel's interval during which some compute kernel runs on another stream;
    overlap_fraction = overlapped / collective time (None without collectives); exposed_collective_us: the rest.
    """
    if steps <= 0:
        raise ValueError(f"steps = {steps} must be > 0")
    evs = [Event(*e) for e in events]
    kind = [classify(e.name) for e in evs]
    compute_by_stream: dict[object, list[tuple[float, float]]] = collections.defaultdict(list)
    for e, k in zip(evs, kind):
        if k == "compute":
            compute_by_stream[e.stream].append((e.start, e.start + e.dur))
    others: dict[object, tuple[list, list]] = {}   # stream -> compute on every other stream, merged
    sums = collections.Counter()
    names: dict[str, list] = {}
    per_stream: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e, k in zip(evs, kind):
        sums[k] += e.dur
        per_stream[str(e.stream)][k] += e.dur
        if k != "collective":
            continue
        if e.stream not in others:
            m = merge_intervals(iv for s, ivs in compute_by_stream.items() if s != e.stream for iv in ivs)
            others[e.stream] = (m, [s for s, _ in m])
        ov = covered(e.start, e.start + e.dur, *others[e.stream])
        sums["overlapped"] += ov
        n = names.setdefault(e.name[:160], [0, 0.0, 0.0])
        n[0] += 1
        n[1] += e.dur
        n[2] += ov
    coll = sums["collective"]
    return {
        "steps": steps,
        "kernels": len(evs),
        "collective_us": coll / steps,
        "compute_us": sums["compute"] / steps,
        "memory_us": sums["memory"] / steps,
        "collective_overlapped_us": sums["overlapped"] / steps,
        "exposed_collective_us": (coll - sums["overlapped"]) / steps,
        "overlap_fraction": sums["overlapped"] / coll if coll > 0 else None,
        "collective_kernels": [dict(name=n, count=c / steps, us=t / steps, overlapped_us=o / steps)
                               for n, (c, t, o) in sorted(names.items(), key=lambda kv: -kv[1][1])],
        "streams": {s: {k: v / steps for k, v in c.items()} for s, c in sorted(per_stream.items())},
    }


# Lines of a device that repeat its kernels at another level (XLA ops, modules, steps): never streams.
_DERIVED_LINES = re.compile(r"xla ops|xla modules|steps|tensorflow|name scope|source|framework|launch stats",
                            re.IGNORECASE)


def trace_names(events: list) -> tuple[dict, dict]:
    """({pid: process name}, {(pid, tid): thread name}) from a trace's metadata events."""
    pname = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    tname = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return pname, tname


def is_device(process_name: str) -> bool:
    """Whether a trace process is an accelerator ('/device:GPU:0'), not the host."""
    return bool(re.search(r"gpu|device|tpu", process_name, re.IGNORECASE)
                and not re.search(r"host|cpu", process_name, re.IGNORECASE))


def device_kernels(trace: dict | list) -> tuple[dict[str, list[Event]], dict]:
    """Kernels per device of a perfetto/chrome trace: {process name: [Event]}, plus what was seen.

    Devices are processes named like '/device:GPU:0'; kernels are complete ('X') events on threads named
    'Stream #N(...)' (when no thread of a device says 'stream', every thread but the derived op/module lines).
    """
    ev = trace["traceEvents"] if isinstance(trace, dict) else trace
    pname, tname = trace_names(ev)
    devices = {pid for pid, n in pname.items() if is_device(n)}
    threads = collections.defaultdict(set)
    for (pid, tid), n in tname.items():
        if pid in devices:
            threads[pid].add((tid, n))
    keep = {}
    for pid in devices:
        streams = {tid for tid, n in threads[pid] if "stream" in n.lower()}
        keep[pid] = streams or {tid for tid, n in threads[pid] if not _DERIVED_LINES.search(n)}
    out: dict[str, list[Event]] = collections.defaultdict(list)
    for e in ev:
        pid = e.get("pid")
        if e.get("ph") != "X" or pid not in devices:
            continue
        tid = e.get("tid")
        if (pid, tid) in tname and tid not in keep[pid]:
            continue
        out[pname[pid]].append(Event(e.get("name", ""), float(e["ts"]), float(e.get("dur", 0.0)),
                                     tname.get((pid, tid), tid)))
    seen = {"processes": sorted(set(pname.values())),
            "device_threads": sorted({f"{pname[p]}: {n}" for p in devices for _, n in threads[p]})}
    return dict(out), seen


def record_trace(run, dst: str, python_frames: bool = True):
    """Runs `run()` under `jax.profiler.trace(create_perfetto_trace=True)` and copies the perfetto trace to `dst`.
    Returns run()'s result (block on it inside `run`); raises FileNotFoundError if the profiler wrote no trace.
    python_frames=False leaves Python frames out (device kernels are what the summaries read; smaller files)."""
    import glob
    import os
    import shutil
    import tempfile

    import jax

    opts = jax.profiler.ProfileOptions()
    if not python_frames:
        opts.python_tracer_level = 0
    with tempfile.TemporaryDirectory(prefix="lcflash_trace_") as tdir:
        with jax.profiler.trace(tdir, create_perfetto_trace=True, profiler_options=opts):
            out = run()
        found = glob.glob(os.path.join(tdir, "**", "perfetto_trace.json.gz"), recursive=True)
        if not found:
            raise FileNotFoundError(f"the profiler wrote no perfetto_trace.json.gz under {tdir}")
        shutil.copy(found[0], dst)
    return out


def load_trace(path: str) -> dict | list:
    """A perfetto / chrome trace file (.json or .json.gz)."""
    import gzip
    import json

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        return json.load(fh)


def kernel_totals(trace: str | dict | list) -> tuple[dict[str, list], list[Event], dict]:
    """({kernel name: [count, total us]} over every device, the kernels themselves, what was seen) of a trace
    (a file's path, or a trace load_trace already read): the per-kernel view the decode and training profiles
    build on."""
    per_device, seen = device_kernels(load_trace(trace) if isinstance(trace, str) else trace)
    kernels = [e for evs in per_device.values() for e in evs]
    by_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.dur
    return dict(by_name), kernels, seen


def summarize_trace(path: str, steps: int) -> dict:
    """Per device `overlap_summary` of a perfetto trace file (.json or .json.gz), and the mean over devices."""
    kernels, seen = device_kernels(load_trace(path))
    per_device = {d: overlap_summary(evs, steps) for d, evs in sorted(kernels.items())}
    mean = {}
    if per_device:
        for k in ("collective_us", "compute_us", "memory_us", "collective_overlapped_us", "exposed_collective_us"):
            mean[k] = sum(s[k] for s in per_device.values()) / len(per_device)
        mean["overlap_fraction"] = (mean["collective_overlapped_us"] / mean["collective_us"]
                                    if mean["collective_us"] > 0 else None)
    return {"steps": steps, "mean": mean, "devices": per_device, **seen}


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="perfetto_trace.json.gz written by jax.profiler.trace(create_perfetto_trace=True)")
    ap.add_argument("--steps", type=int, default=1, help="steps the trace holds (times are divided by it)")
    args = ap.parse_args(argv)
    print(json.dumps(summarize_trace(args.trace, args.steps), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
