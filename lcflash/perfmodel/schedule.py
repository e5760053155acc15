"""Decode-step schedules as dependency graphs on in-order streams, and the step-level metrics.

Each op runs on one stream ('compute', 'rdma' or 'nvlink'); streams issue in program order and an op starts when
its stream is free and its inputs are done. The step time is the makespan of the whole step (all layers, LM
head, MTP draft), so overlap across layer boundaries is accounted for, not assumed.

* sequential: one stream for everything (no overlap).
* sbo: single-batch overlap. For ScMoE layers the program order is the four stages of reference §8.3:
  (1) MLA 0 + router; (2) dispatch || dense FFN 0 + attention 1's projections; (3) expert GEMMs;
  (4) combine || attention 1's core and output + dense FFN 1. For a standard MoE layer the only independent work
  is the shared expert, which overlaps dispatch.
* tbo: two micro-batches of half the sequences, so one micro-batch's all-to-all overlaps the other's compute.
  Candidate program orders: 'halves' ([pre-dispatch ops of mb0, of mb1, rest of mb0, rest of mb1] per layer)
  and staggered lags (mb1 runs g stages behind mb0); the fastest is kept. Weights are read once per
  micro-batch. The LM head and MTP draft run on the whole batch.

Because every schedule keeps each op's dependencies and the program order, sbo can never be slower than
sequential (each op starts no later than in the one-stream order).
"""

from __future__ import annotations

import collections
import dataclasses

from lcflash.perfmodel.estimate import Workload, memory_per_gpu, step_components
from lcflash.perfmodel.hardware import PEAK, Cluster, Efficiency
from lcflash.perfmodel.models import ModelSpec

SCHEDULES = ("sequential", "sbo", "tbo")

# Stages of (op, component, deps) in program order; "IN" is the layer input. Second item: the output ops.
# Stage boundaries are where TBO may switch micro-batch (after an all-to-all is issued, or before a core).
SCMOE_LAYER = ([
    [("mla0_in", "attn_in", ["IN"])],
    [("mla0_core", "attn_core", ["mla0_in"]),
     ("mla0_out", "attn_out", ["mla0_core"]),
     ("router", "router", ["mla0_out"]),
     ("dispatch", "dispatch", ["router"])],
    [("ffn0", "dense_ffn", ["mla0_out"]),
     ("mla1_in", "attn_in", ["ffn0"])],
    [("experts", "experts", ["dispatch"]),
     ("combine", "combine", ["experts"])],
    [("mla1_core", "attn_core", ["mla1_in"]),
     ("mla1_out", "attn_out", ["mla1_core"]),
     ("ffn1", "dense_ffn", ["mla1_out"])],
], ["combine", "ffn1"])
MOE_LAYER = ([
    [("attn_in", "attn_in", ["IN"])],
    [("attn_core", "attn_core", ["attn_in"]),
     ("attn_out", "attn_out", ["attn_core"]),
     ("router", "router", ["attn_out"]),
     ("dispatch", "dispatch", ["router"])],
    [("shared", "shared_expert", ["attn_out"]),
     ("experts", "experts", ["dispatch"]),
     ("combine", "combine", ["experts"])],
], ["combine", "shared"])
DENSE_LAYER = ([
    [("attn_in", "attn_in", ["IN"])],
    [("attn_core", "attn_core", ["attn_in"]),
     ("attn_out", "attn_out", ["attn_core"])],
    [("ffn", "dense_ffn", ["attn_out"])],
], ["ffn"])


@dataclasses.dataclass(frozen=True)
class Op:
    key: str
    component: str
    resource: str
    seconds: float
    deps: tuple


def _resolve_template(template, comps: dict, prefix: str):
    """Drops ops whose component is absent (e.g. no dispatch at ep=1) and adds TP collectives around dense FFNs.

    Returns stages of [(op, component, resource, seconds, deps)] and the output op names.
    """
    stages, outs = template
    alias = {}  # removed or wrapped op -> the op names its dependents should wait on

    def deps_of(names):
        res = []
        for n in names:
            res.extend(alias.get(n, [n]))
        return res

    resolved = []
    for stage in stages:
        cur = []
        for name, comp, deps in stage:
            key = prefix + comp
            d = deps_of(deps)
            if key not in comps:
                alias[name] = d
                continue
            if comp == "dense_ffn" and prefix + "dense_ffn_allgather" in comps:
                ag, rs = comps[prefix + "dense_ffn_allgather"], comps[prefix + "dense_ffn_reducescatter"]
                cur.append((name + "_ag", ag.name, ag.resource, ag.seconds, d))
                cur.append((name, key, "compute", comps[key].seconds, [name + "_ag"]))
                cur.append((name + "_rs", rs.name, rs.resource, rs.seconds, [name]))
                alias[name] = [name + "_rs"]
                continue
            c = comps[key]
            cur.append((name, key, c.resource, c.seconds, d))
        resolved.append(cur)
    return resolved, deps_of(outs)


def _tbo_orders(n_stages: int, stages_per_layer: int):
    """Staggered interleavings of two micro-batches' stage sequences: {"lag<g>": [(mb, stage index)]}.

    'lag g' alternates stage k of mb0 with stage k - g of mb1 (the staggered pipelines of DeepSeek's decode
    overlap). build_step_ops adds the 'halves' order itself.
    """
    orders = {}
    for g in range(0, 2 * stages_per_layer + 1):
        order = []
        for k in range(n_stages + g):
            if k < n_stages:
                order.append((0, k))
            if 0 <= k - g < n_stages:
                order.append((1, k - g))
        orders[f"lag{g}"] = order
    return orders


def build_step_ops(spec: ModelSpec, wl: Workload, mb_comps: list, full_comps: dict, order=None) -> list:
    """The op list of one decode step in program order.

    mb_comps: components per micro-batch (one entry: single batch). order: for two micro-batches, the
    interleaving of (mb, global stage index) from _tbo_orders, or "halves"; ignored for one micro-batch.
    """
    ops: list[Op] = []
    per_mb_stages = [[] for _ in mb_comps]  # (layer, stage index in layer, ops), all layers in order
    layer_outs = [[] for _ in mb_comps]
    for layer in range(spec.num_layers):
        if spec.layer_kind == "scmoe":
            template = SCMOE_LAYER
        else:
            template = DENSE_LAYER if layer < spec.first_dense_layers else MOE_LAYER
        for mb, comps in enumerate(mb_comps):
            stages, out = _resolve_template(template, comps, "")
            for k, st in enumerate(stages):
                per_mb_stages[mb].append((layer, k, st))
            layer_outs[mb].append(out)

    local = [dict() for _ in mb_comps]  # (layer, op name) -> index

    def emit_stage(mb, idx):
        layer, _, st = per_mb_stages[mb][idx]
        in_deps = [] if layer == 0 else [local[mb][(layer - 1, n)] for n in layer_outs[mb][layer - 1]]
        for name, comp, res, secs, deps in st:
            idx_deps = []
            for d in deps:
                idx_deps.extend(in_deps if d == "IN" else [local[mb][(layer, d)]])
            local[mb][(layer, name)] = len(ops)
            ops.append(Op(f"L{layer}.mb{mb}.{name}", comp, res, secs, tuple(idx_deps)))

    n = len(per_mb_stages[0])
    if len(mb_comps) == 1:
        seq = [(0, k) for k in range(n)]
    elif order == "halves":
        seq = []
        starts = [k for k in range(n) if per_mb_stages[0][k][1] == 0] + [n]
        for a, b in zip(starts[:-1], starts[1:]):
            names = [[op[0] for op in per_mb_stages[0][k][2]] for k in range(a, b)]
            cut = next((a + i + 1 for i, ns in enumerate(names) if "dispatch" in ns), b)
            for lo, hi in ((a, cut), (cut, b)):
                for mb in (0, 1):
                    seq.extend((mb, k) for k in range(lo, hi))
    else:
        seq = order
    for mb, k in seq:
        emit_stage(mb, k)

    last = spec.num_layers - 1
    all_out = [local[mb][(last, nm)] for mb in range(len(mb_comps)) for nm in layer_outs[mb][last]]
    ops.append(Op("lm_head", "lm_head", "compute", full_comps["lm_head"].seconds, tuple(all_out)))
    if wl.mtp:
        c = full_comps["mtp.eh_proj"]
        ops.append(Op("mtp.eh_proj", c.name, c.resource, c.seconds, (len(ops) - 1,)))
        template = DENSE_LAYER if spec.mtp_kind == "dense" else MOE_LAYER
        stages, out = _resolve_template(template, full_comps, "mtp.")
        loc, in_deps = {}, [len(ops) - 1]
        for st in stages:
            for name, comp, res, secs, deps in st:
                idx_deps = []
                for d in deps:
                    idx_deps.extend(in_deps if d == "IN" else [loc[d]])
                loc[name] = len(ops)
                ops.append(Op(f"mtp.{name}", comp, res, secs, tuple(idx_deps)))
        c = full_comps["mtp.lm_head"]
        ops.append(Op("mtp.lm_head", c.name, c.resource, c.seconds, tuple(loc[n] for n in out)))
    return ops


@dataclasses.dataclass(frozen=True)
class Timeline:
    makespan: float
    start: tuple
    finish: tuple
    critical: tuple  # op indices on the critical path, last first


def simulate(ops: list, serial: bool = False) -> Timeline:
    """In-order streams: start = max(stream free, inputs done). serial=True puts every op on one stream."""
    free = collections.defaultdict(float)
    last_on = {}
    start, finish, pred = [], [], []
    for i, op in enumerate(ops):
        res = "serial" if serial else op.resource
        s, p = free[res], last_on.get(res, -1)
        for d in op.deps:
            if finish[d] > s:
                s, p = finish[d], d
        start.append(s)
        finish.append(s + op.seconds)
        pred.append(p)
        free[res] = finish[-1]
        last_on[res] = i
    if not ops:
        return Timeline(0.0, (), (), ())
    i = max(range(len(ops)), key=finish.__getitem__)
    critical = []
    while i >= 0:
        critical.append(i)
        i = pred[i]
    return Timeline(max(finish), tuple(start), tuple(finish), tuple(critical))


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """One decode step of one GPU under one schedule, with the per-component breakdown."""

    model: str
    cluster: str
    schedule: str
    step_seconds: float
    schedule_seconds: dict
    overlap_bound_seconds: dict
    variant: str
    batch_per_gpu: float
    expected_tokens: float
    components: tuple
    resource_busy: dict
    memory: dict
    workload: Workload

    @property
    def tpot_seconds(self) -> float:
        return self.step_seconds / self.expected_tokens

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.batch_per_gpu * self.expected_tokens / self.step_seconds

    def usd_per_million_tokens(self, usd_per_gpu_hour: float) -> float:
        return usd_per_gpu_hour / 3600.0 / self.tokens_per_s_per_gpu * 1e6


def default_schedule(spec: ModelSpec) -> str:
    """The report's pairing: SBO for ScMoE (LongCat-Flash), TBO for the standard-MoE baselines."""
    return "sbo" if spec.layer_kind == "scmoe" else "tbo"


def _component_rows(ops, timeline: Timeline, comps_by_name: dict) -> tuple:
    rows = {}
    on_path = collections.Counter()
    for i in timeline.critical:
        on_path[ops[i].component] += ops[i].seconds
    for op in ops:
        r = rows.setdefault(op.component, dict(name=op.component, calls=0, total_seconds=0.0))
        r["calls"] += 1
        r["total_seconds"] += op.seconds
    out = []
    for name, r in rows.items():
        c = comps_by_name[name]
        out.append(dict(name=name, resource=c.resource, calls=r["calls"],
                        seconds_per_call=r["total_seconds"] / r["calls"], total_seconds=r["total_seconds"],
                        critical_seconds=on_path[name], bytes_per_call=c.bytes, flops_per_call=c.flops,
                        bound=c.bound))
    return tuple(out)


def schedule_variants(spec: ModelSpec, cluster: Cluster, wl: Workload, eff: Efficiency, schedule: str):
    """[(variant, ops)] of one step under `schedule`, plus the components by name the ops refer to.

    tbo has several program orders (the 'halves' order and staggered lags); the caller keeps the fastest, as a
    deployment would tune its overlap stages (DeepEP README: "You may adjust the stage settings").
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is invalid; valid: {SCHEDULES + ('auto',)}")
    full = step_components(spec, cluster, eff, wl, wl.batch_per_gpu)
    if schedule != "tbo":
        return [(schedule, build_step_ops(spec, wl, [full], full))], full
    half = step_components(spec, cluster, eff, wl, wl.batch_per_gpu / 2)
    by_name = {**full, **{k: v for k, v in half.items() if not k.startswith("mtp.") and k != "lm_head"}}
    per_layer = len((SCMOE_LAYER if spec.layer_kind == "scmoe" else MOE_LAYER)[0])
    n_stages = sum(len((SCMOE_LAYER if spec.layer_kind == "scmoe" else
                        (DENSE_LAYER if layer < spec.first_dense_layers else MOE_LAYER))[0])
                   for layer in range(spec.num_layers))
    orders = {"halves": "halves", **_tbo_orders(n_stages, per_layer)}
    return [(f"tbo:{k}", build_step_ops(spec, wl, [half, half], full, order=o)) for k, o in orders.items()], by_name


def busy_seconds(ops) -> dict:
    busy = collections.Counter()
    for op in ops:
        busy[op.resource] += op.seconds
    return dict(busy)


def estimate_step(spec: ModelSpec, cluster: Cluster, wl: Workload, eff: Efficiency = PEAK,
                  schedule: str = "auto", all_schedules: bool = True) -> StepEstimate:
    """Costs one decode step and reports the chosen schedule ('auto': default_schedule).

    schedule_seconds: simulated step per schedule (best variant; every schedule unless all_schedules=False).
    overlap_bound_seconds: per schedule, the busiest stream's total work, i.e. the step if overlap were
    perfect; no ordering of those ops can beat it.
    """
    chosen = default_schedule(spec) if schedule == "auto" else schedule
    if chosen not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is invalid; valid: {SCHEDULES + ('auto',)}")
    seconds, bounds, variants, picked = {}, {}, {}, None
    for s in (SCHEDULES if all_schedules else (chosen,)):
        cands, by_name = schedule_variants(spec, cluster, wl, eff, s)
        best = None
        for label, ops in cands:
            tl = simulate(ops, serial=(s == "sequential"))
            if best is None or tl.makespan < best[2].makespan:
                best = (label, ops, tl)
        label, ops, tl = best
        seconds[s], variants[s] = tl.makespan, label
        bounds[s] = tl.makespan if s == "sequential" else max(busy_seconds(ops).values())
        if s == chosen:
            picked = (ops, tl, by_name)
    ops, tl, by_name = picked
    return StepEstimate(model=spec.name, cluster=cluster.name, schedule=chosen, step_seconds=tl.makespan,
                        schedule_seconds=seconds, overlap_bound_seconds=bounds, variant=variants[chosen],
                        batch_per_gpu=wl.batch_per_gpu, expected_tokens=wl.expected_tokens,
                        components=_component_rows(ops, tl, by_name), resource_busy=busy_seconds(ops),
                        memory=memory_per_gpu(spec, wl), workload=wl)


_CFG_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}


def predict_decode_step(model_cfg, cluster="h100", batch: float = 1, context: int = 0, *,
                        efficiency: Efficiency = PEAK, mtp: bool = False, mtp_acceptance: float = 0.0,
                        mla_absorb: bool = True) -> StepEstimate:
    """Predicted decode step of an lcflash ModelConfig on ONE GPU (no EP, no TP): for the inference benchmark.

    Number formats come from the config as the JAX model runs it: weights (and LM head) stored in
    `param_dtype`, matmuls and the cache in `dtype` (float16 is costed like bfloat16, float32 at the TF32 rate).
    `batch` sequences each hold `context` cached tokens; with mtp=True each verifies 2 tokens per step.
    `mla_absorb=False` costs the plain (non-absorbed) MLA decode that re-expands the latent cache every step.
    Returns the StepEstimate; `.step_seconds` is the number to compare with a measured step.
    """
    from lcflash.perfmodel.hardware import get_cluster
    from lcflash.perfmodel.models import from_lcflash

    cl = get_cluster(cluster)
    wdt, adt = _CFG_DTYPES[model_cfg.param_dtype], _CFG_DTYPES[model_cfg.dtype]
    wl = Workload(batch_per_gpu=batch, context=context, ep=1, tp=1, mtp=mtp, mtp_acceptance=mtp_acceptance,
                  weight_dtype=wdt, head_dtype=wdt, kv_dtype=adt, act_dtype=adt, dispatch_dtype="bf16",
                  mla_absorb=mla_absorb)
    spec = from_lcflash(model_cfg, name="lcflash")
    return estimate_step(spec, cl, wl, efficiency, schedule="sequential")
