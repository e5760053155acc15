"""Where a decode step's device time goes: kernels of a perfetto trace joined to the optimised HLO's op names.

    python experiments/bench_decode.py --part=jax --batches=1 --contexts=1024 --impls=absorbed --profile \
        --dump_hlo --out_dir=OUT --json=OUT/r.json                      # on the GPU: trace + HLO
    python experiments/decode_profile.py --hlo=OUT/hlo_absorbed_b1.txt --trace=OUT/trace_decode_b1_absorbed.json.gz \
        --steps=33 [--json=experiments/decode_profile_h200.json]

The trace names kernels by fusion (`input_reduce_fusion_10`); the HLO line of that fusion (by name or its
`deduplicated_name`) carries the JAX op it came from (`op_name="...btd,dr->btr/dot_general"`). Prints the costliest
kernels and the time per JAX op, per decode step, and the step's critical path: the longest chain of kernels by data
dependencies, which a batch-1 step waits on however many kernels run beside it (in kernels and, with the trace's
times, in us; by layer part). `--hlo` alone gives the path in kernels:

    python experiments/decode_profile.py --hlo=OUT/hlo_pallas_b1.txt
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcflash.parallel import trace_overlap  # noqa: E402


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
# The fusion a kernel was deduplicated into, which a trace names it after: an attribute or a backend_config key.
_DEDUP = re.compile(r'deduplicated_name"?[=:]"([^"]*)"')
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in `text` (`bf16[32,1024]{1,0}`, tuples included)."""
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


# Ops of an optimised GPU program that launch no kernel: views, tuples, constants; `call`s (command buffers) and
# `while`s are walked into.
_FREE = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier", "after-all",
                   "add-dependency", "partition-id", "replica-id"})


def _free(opcode: str) -> bool:
    """No kernel of its own: a view or a tuple, or the wait half of an async pair (`copy-done`; its `-start` is the
    kernel)."""
    return opcode in _FREE or opcode.endswith("-done")


_INSTR = re.compile(r"\s*(ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")


def hlo_computations(hlo_text: str) -> tuple[dict, str]:
    """({computation: [(instruction, opcode, operands, attributes, is_root)]}, entry computation's name). The
    attributes kept: the result shape, body, to_apply, calls, index, the JAX op_name and the deduplicated_name
    (`dedup`)."""
    comps, cur, entry = {}, None, None
    for line in hlo_text.split("\n"):
        m = _COMP.match(line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            entry = cur if m.group(1) else entry
        elif line.startswith("}"):
            cur = None
        elif cur is not None and (m := _INSTR.match(line)):
            root, name, shape, opcode, rest = m.groups()
            depth, i = 1, 0
            while i < len(rest) and depth:  # the operand list ends at its matching parenthesis
                depth += {"(": 1, ")": -1}.get(rest[i], 0)
                i += 1
            args = rest[:i - 1]
            attrs = dict(re.findall(r"\b(body|to_apply|index|calls)=%?([\w.\-]+)", rest[i:]), shape=shape)
            if op := re.search(r'op_name="([^"]*)"', rest[i:]):
                attrs["op_name"] = op.group(1)
            if dedup := _DEDUP.search(rest[i:]):
                attrs["dedup"] = dedup.group(1)
            if opcode == "parameter":
                attrs["number"] = args.strip()
            comps[cur].append((name, opcode, re.findall(r"%([\w.\-]+)", args), attrs, bool(root)))
    return comps, entry


def hlo_ops(hlo_text: str, parsed=None) -> dict:
    """Kernel name (dots as underscores, as in traces) -> (result shape, JAX op name, bytes of its operands and
    results). The bytes are an upper bound on what the kernel moves: a fusion that slices an operand (one layer of
    a stacked weight) reads less, one that reads an operand twice more. parsed: hlo_computations(hlo_text)."""
    comps, _ = parsed or hlo_computations(hlo_text)
    instrs = [i for body in comps.values() for i in body]
    shapes = {name: attrs["shape"] for name, _, _, attrs, _ in instrs}
    info = {}
    for name, opcode, operands, attrs, _ in instrs:
        if opcode not in ("fusion", "custom-call"):
            continue
        op_name = re.sub(r"^jit\([^)]*\)/(while/body/)?", "", attrs.get("op_name", ""))
        nbytes = shape_bytes(attrs["shape"]) + sum(shape_bytes(shapes.get(o, "")) for o in operands)
        for key in [name] + ([attrs["dedup"]] if "dedup" in attrs else []):
            info.setdefault(key.replace(".", "_"), (attrs["shape"], op_name, nbytes))
    return info


def _latest(values):
    """The (time, chain) that finishes last among values, tuples (lists) flattened."""
    flat = [_latest(v) if isinstance(v, list) else v for v in values]
    return max(flat, key=lambda d: d[0], default=(0.0, ()))


def critical_path(hlo_text: str, computation: str | None = None, weight=None, parsed=None) -> dict:
    """The longest chain of kernels through one computation of an optimised HLO, by data dependencies: what a
    step waits on if every kernel starts as soon as its inputs exist (a CUDA graph with concurrent nodes).
    computation: by default the one with the most kernels of the entry and the while bodies (a decode loop's step;
    a training step's entry). A nested while counts its body once. weight(instruction name) -> one kernel's cost
    (default 1: the path in kernels). parsed: hlo_computations(hlo_text), where the caller has it already. Returns
    the computation, its kernels, the path's cost and its kernels in order."""
    comps, entry = parsed or hlo_computations(hlo_text)
    weight = weight or (lambda name: 1.0)

    def walk(comp, params):
        done, root = {}, None
        for name, opcode, operands, attrs, is_root in comps[comp]:
            ins = [done[o] for o in operands if o in done]
            if opcode == "parameter":
                v = params.get(int(attrs["number"]), (0.0, ()))
            elif opcode == "tuple":
                v = ins
            elif opcode == "get-tuple-element":
                v = ins[0][int(attrs["index"])] if ins and isinstance(ins[0], list) else _latest(ins)
            elif _free(opcode):
                v = _latest(ins)
            elif opcode == "call" and "to_apply" in attrs:
                v = walk(attrs["to_apply"], dict(enumerate(ins)))
            elif opcode == "while" and "body" in attrs:
                v = walk(attrs["body"], {0: ins[0] if ins else (0.0, ())})
            else:
                t, chain = _latest(ins)
                v = (t + weight(name), chain + (name,))
            done[name] = v
            root = name if is_root else root
        return done[root] if root else _latest(done.values())

    def kernels(comp):
        return sum(not _free(op) and op not in ("call", "while") for _, op, _, _, _ in comps[comp]) + sum(
            kernels(a["to_apply"]) for _, op, _, a, _ in comps[comp] if op == "call" and "to_apply" in a)

    if computation is None:
        bodies = [a["body"] for instrs in comps.values() for _, op, _, a, _ in instrs if op == "while" and "body" in a]
        computation = max([entry] + bodies, key=kernels)
    t, chain = _latest([walk(computation, {})])
    return {"computation": computation, "kernels": kernels(computation), "path": t, "chain": list(chain)}


SCOPES = ("attn_0", "attn_1", "mlp_0", "mlp_1", "moe_dispatch", "moe_combine", "moe", "mtp", "lm_head", "embed")


def part(kernel: str, op: str) -> str:
    """A coarse label for one kernel: the library (cuBLAS, cuDNN, our Mosaic GPU kernels, copies) or, for XLA's own
    kernels, the pass (a training step's forward, backward, rematerialised, or outside the gradient) and the layer
    part its op name is scoped in."""
    if "mosaic_gpu" in kernel:
        return "Mosaic GPU kernels (ours)"
    if kernel.startswith("gemm_fusion"):
        return "XLA matmul fusions (Triton)"
    if re.search(r"nvjet|xmma|cutlass|gemm|sm90_|cublas", kernel) and not kernel.startswith(("loop_", "input_")):
        return "cuBLAS"
    if "cudnn" in kernel.lower() or "fmha" in kernel.lower():
        return "cuDNN"
    if kernel.startswith(("memcpy", "memset")):
        return "copies"
    where = ("recomputed" if "rematted_computation" in op else "backward" if op.startswith("transpose(")
             else "forward" if op.startswith("jvp(") else "outside the gradient (optimizer, metrics)")
    scope = next((s for s in SCOPES if f"/{s}/" in f"/{op}/"), None)
    return f"XLA {where}: {scope or 'other'}"


def path_summary(hlo_text: str, us_each: dict | None = None, parsed=None) -> dict:
    """critical_path of the decode step in kernels and, with us_each (trace kernel name -> mean us), in time (a
    kernel the trace does not name, such as a custom call, weighs the median kernel), with the path's kernels
    counted by layer part (SCOPES). parsed: hlo_computations(hlo_text)."""
    parsed = parsed or hlo_computations(hlo_text)
    comps = parsed[0]
    attrs = {name: a for instrs in comps.values() for name, _, _, a, _ in instrs}
    roots = {c: next((a for _, _, _, a, is_root in instrs if is_root), {}) for c, instrs in comps.items()}
    med = sorted(us_each.values())[len(us_each) // 2] if us_each else 1.0

    def us(n):  # a trace names a kernel after its fusion, or the fusion XLA deduplicated it into
        return us_each.get(attrs.get(n, {}).get("dedup", n).replace(".", "_"), med)

    res = critical_path(hlo_text, weight=us if us_each else None, parsed=parsed)

    def op_name(n):  # a fusion without metadata (XLA:CPU leaves some) takes its fused root's
        a = attrs.get(n, {})
        return a.get("op_name") or roots.get(a.get("calls"), {}).get("op_name", "")

    scopes = collections.Counter(next((s for s in SCOPES if f"/{s}/" in f"/{op_name(n)}/"), "other")
                                 for n in res["chain"])
    return {"step_kernels": res["kernels"], "path_kernels": len(res["chain"]),
            "path_us": res["path"] if us_each else None, "path_by_scope": dict(scopes.most_common()),
            "computation": res["computation"]}


def _safe_path_summary(hlo_text: str, us_each: dict, parsed) -> dict:
    """path_summary, or why not: a text it cannot parse must not cost the rest of a profile."""
    try:
        return path_summary(hlo_text, us_each, parsed)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def profile(hlo_text: str, trace_path: str, steps: int, top: int = 25) -> dict:
    parsed = hlo_computations(hlo_text)
    info = hlo_ops(hlo_text, parsed)
    trace = trace_overlap.load_trace(trace_path)
    by, device_events, _ = trace_overlap.kernel_totals(trace)
    per_op = collections.defaultdict(lambda: [0.0, 0.0])
    per_part = collections.defaultdict(lambda: [0.0, 0.0])
    for name, (count, us) in by.items():
        op = info.get(name, ("?", "?", 0))[1] or "(no op name)"
        for table, key in ((per_op, op), (per_part, part(name, op))):
            table[key][0] += count / steps
            table[key][1] += us / steps
    kernels = []
    for n, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:top]:
        shape, op, nbytes = info.get(n, ("?", "?", 0))
        # GB/s at the operand + result bytes: far below the copy rate marks a fusion that moves more than it must.
        kernels.append(dict(name=n, per_step=c / steps, us_per_step=t / steps, us_each=t / c, shape=shape, op=op,
                            bytes_each=nbytes, gb_per_s=nbytes * c / t / 1e3 if nbytes and t else None))
    ops = [dict(op=o, kernels_per_step=c, us_per_step=t) for o, (c, t) in sorted(per_op.items(), key=lambda kv: -kv[1][1])]
    return {"kernels_per_step": sum(c for c, _ in by.values()) / steps,
            "busy_us_per_step": sum(t for _, t in by.values()) / steps, **launch_view(trace, device_events, steps),
            "critical_path": _safe_path_summary(hlo_text, {n: t / c for n, (c, t) in by.items() if c}, parsed),
            "top_kernels": kernels, "by_op": ops,
            "by_part": [dict(part=k, kernels_per_step=c, us_per_step=t)
                        for k, (c, t) in sorted(per_part.items(), key=lambda kv: -kv[1][1])]}


def print_kernels(kernels):
    print(f"{'per step':>8} {'us/step':>8} {'us each':>8} {'GB/s':>6}  kernel / result shape / op")
    for k in kernels:
        gbps = f"{k['gb_per_s']:6.0f}" if k.get("gb_per_s") else f"{'':6}"
        print(f"{k['per_step']:8.1f} {k['us_per_step']:8.1f} {k['us_each']:8.2f} {gbps}  {k['name']}  "
              f"{k['shape'][:40]}  {k['op'][:70]}")


def launch_view(trace, kernels, steps: int, gap_us: float = 3.0, top: int = 10) -> dict:
    """How the host feeds the device: launch calls per step on the host (graph launches of XLA's command buffers,
    single kernel launches; a step split into many graph pieces shows here) and the device's idle time in gaps
    longer than gap_us, when no kernel runs on any stream (kernels overlap under concurrent streams, so a gap
    counts from the latest end so far, not from the previous kernel's). Each gap is charged to the kernel that ended
    last before it and the one that starts it (`idle_between`, the top pairs by idle time). The idle time is the
    traced run's: the profiler slows each loop iteration (an H200 batch-1 decode showed ~1.1 ms of idle per step
    traced at an untraced step time equal to its kernel time), so compare step times untraced."""
    gaps = []                                          # (start, end, kernel before, kernel after)
    end, last = None, None
    for k in sorted(kernels, key=lambda e: e.start):
        if end is not None and k.start - end > gap_us:
            gaps.append((end, k.start, last.name, k.name))
        if end is None or k.start + k.dur > end:
            end, last = k.start + k.dur, k
    idle = collections.defaultdict(lambda: [0, 0.0])   # (kernel before, kernel after): [gaps, us]
    for start, stop, after, before in gaps:
        idle[after, before][0] += 1
        idle[after, before][1] += stop - start
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    launches = collections.Counter(e["name"].split(" ")[0] for e in events
                                   if e.get("ph") == "X" and "Launch" in e.get("name", ""))
    pairs = sorted(idle.items(), key=lambda kv: -kv[1][1])[:top]
    return {"device_idle_us_per_step": sum(t for _, t in idle.values()) / steps,
            "device_gaps_per_step": sum(c for c, _ in idle.values()) / steps,
            "idle_between": [dict(after=a, before=b, gaps_per_step=c / steps, us_per_step=t / steps)
                             for (a, b), (c, t) in pairs],
            "host_launches_per_step": {k: v / steps for k, v in launches.most_common(6)},
            "long_gaps": long_gaps(events, gaps, t0=min((k.start for k in kernels), default=0.0))}


def long_gaps(events, gaps, t0: float, top: int = 6, per_thread: int = 4) -> list:
    """The `top` longest single device gaps (`at_ms` after the first kernel, `us` long), each with what the host
    did during it: per host thread, the shortest event spanning the whole gap (where the host waited) and the
    longest ones starting inside it (what it ran instead of launching)."""
    pname, tname = trace_overlap.trace_names(events)
    host = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e
            and not trace_overlap.is_device(pname.get(e.get("pid"), ""))]
    out = []
    for start, end, after, before in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        threads = collections.defaultdict(lambda: {"spanning": None, "inside": []})
        for e in host:
            s, d = float(e["ts"]), float(e["dur"])
            if s >= end or s + d <= start:
                continue
            t = threads[tname.get((e["pid"], e.get("tid")), str(e.get("tid")))]
            if s <= start and s + d >= end:
                if t["spanning"] is None or d < t["spanning"][1]:
                    t["spanning"] = (e.get("name", "")[:100], d)
            elif s > start:
                t["inside"].append((e.get("name", "")[:100], round(s - start, 1), round(d, 1)))
        host_view = {name: {"spanning": t["spanning"][0] if t["spanning"] else None,
                            "inside": sorted(t["inside"], key=lambda x: -x[2])[:per_thread]}
                     for name, t in threads.items()}
        out.append({"at_ms": round((start - t0) / 1e3, 3), "us": round(end - start, 1), "after": after,
                    "before": before, "host": host_view})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hlo", required=True)
    ap.add_argument("--trace", default=None, help="without it, only the step's critical path in kernels")
    ap.add_argument("--steps", type=int, default=None, help="decode steps inside the traced call")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.trace and not args.steps:
        ap.error("--trace needs --steps (the decode steps inside the traced call)")
    with open(args.hlo) as f:
        hlo_text = f.read()
    if not args.trace:
        res = {"critical_path": path_summary(hlo_text)}
        print_path(res["critical_path"])
    else:
        res = profile(hlo_text, args.trace, args.steps, args.top)
        print_profile(res)
    if args.json:
        res["command"] = "python experiments/decode_profile.py " + " ".join(
            f"--{k}={v}" for k, v in vars(args).items() if k != "json" and v is not None)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def print_path(cp: dict):
    if "error" in cp:
        print(f"critical path: not computed ({cp['error']})")
        return
    us = f", {cp['path_us']:.0f} us" if cp["path_us"] is not None else ""
    print(f"critical path of the step ({cp['computation']}): {cp['path_kernels']} of its {cp['step_kernels']} "
          f"kernels{us}; by layer part: {cp['path_by_scope']}")


def print_profile(res: dict):
    print(f"{res['kernels_per_step']:.0f} kernels and {res['busy_us_per_step']:.0f} us of device time per step; "
          f"device idle {res['device_idle_us_per_step']:.0f} us per step in {res['device_gaps_per_step']:.1f} gaps; "
          f"host launches per step {res['host_launches_per_step']}")
    for g in res["idle_between"]:
        print(f"  idle {g['us_per_step']:8.1f} us/step in {g['gaps_per_step']:.1f} gaps after {g['after'][:50]} "
              f"before {g['before'][:50]}")
    print_kernels(res["top_kernels"])
    print(f"\n{'kernels':>8} {'us/step':>8}  JAX op")
    for o in res["by_op"][:20]:
        print(f"{o['kernels_per_step']:8.1f} {o['us_per_step']:8.1f}  {o['op'][:100]}")
    print_path(res["critical_path"])


if __name__ == "__main__":
    main()
