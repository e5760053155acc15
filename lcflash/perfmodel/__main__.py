"""Command line: decode TPOT, throughput and cost of an lcflash config (and the baselines) on a GPU cluster.

  python -m lcflash.perfmodel --config=configs/longcat_flash.py --cluster=h800 --ep=128 --batch-per-gpu=96 \\
      --mtp-acceptance=0.8 --compare --plot=experiments/perfmodel_tpot.png --json=experiments/perfmodel_compare.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys

from lcflash.config import ConfigError, load_config, model_config
from lcflash.perfmodel.estimate import Workload, WorkloadError
from lcflash.perfmodel.hardware import CLUSTERS, EFFICIENCY_PROFILES, GB, HardwareError, get_cluster
from lcflash.perfmodel.models import BASELINES, from_lcflash
from lcflash.perfmodel.schedule import SCHEDULES, estimate_step

# Public summary of the LongCat-Flash report (reference §9): H800, EP=128, 96 sequences per GPU, MTP ~80%.
REPORT_SCENARIO = dict(cluster="h800", ep=128, batch_per_gpu=96, mtp_acceptance=0.8, usd_per_gpu_hour=2.0)
REPORT = {"LongCat-Flash": (16.0, 0.09), "DeepSeek-V3": (30.0, 0.17), "Qwen3-235B-A22B": (26.2, None)}


def _number(kind, ok, allowed: str):
    """argparse type: parse `kind`, then require `ok(value)`; errors say what is allowed."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}")
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{text!r} must be {allowed}")
        return v
    return parse


def _positive(kind):
    return _number(kind, lambda v: v > 0, "> 0")


_nonneg_int = _number(int, lambda v: v >= 0, ">= 0")
_fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
_efficiency_fraction = _number(float, lambda v: 0.0 < v <= 1.0, "in (0, 1]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lcflash.perfmodel", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/longcat_flash.py", help="lcflash config file (ScMoE model)")
    p.add_argument("--model", default="config", choices=["config", *BASELINES],
                   help="which model to cost: the --config model or a hand-written baseline")
    p.add_argument("--compare", action="store_true", help="also cost DeepSeek-V3 and Qwen3-235B-A22B")
    g = p.add_argument_group("cluster (defaults from --cluster; see lcflash/perfmodel/hardware.py)")
    g.add_argument("--cluster", default="h800", choices=sorted(CLUSTERS))
    g.add_argument("--peak-bf16-tflops", type=_positive(float))
    g.add_argument("--peak-fp8-tflops", type=_positive(float))
    g.add_argument("--hbm-tbs", type=_positive(float), help="HBM bandwidth, TB/s")
    g.add_argument("--hbm-gb", type=_positive(float), help="HBM capacity, GB")
    g.add_argument("--nvlink-gbs", type=_positive(float), help="NVLink GB/s per GPU per direction")
    g.add_argument("--rdma-gbs", type=_positive(float), help="inter-node GB/s per GPU per direction")
    g.add_argument("--nvlink-latency-us", type=float)
    g.add_argument("--rdma-latency-us", type=float)
    g.add_argument("--gpus-per-node", type=_positive(int))
    e = p.add_argument_group("efficiency (fraction of peak, shared by all models)")
    e.add_argument("--efficiency", default="peak", choices=sorted(EFFICIENCY_PROFILES),
                   help="peak: datasheet peaks (the report's 'theoretical'); achievable: best published kernels")
    for f in ("hbm", "gemm", "attention", "network"):
        e.add_argument(f"--eff-{f}", type=_efficiency_fraction)
    e.add_argument("--op-overhead-us", type=float, help="fixed time added to every compute op")
    w = p.add_argument_group("workload")
    w.add_argument("--ep", type=_positive(int), default=128, help="expert-parallel GPUs (= GPUs serving)")
    w.add_argument("--tp", type=_positive(int), default=1, help="tensor parallelism of the dense FFNs in a node")
    w.add_argument("--batch-per-gpu", type=_positive(float), default=96, help="sequences decoded per GPU")
    w.add_argument("--context", type=_nonneg_int, default=5000, help="cached tokens per sequence")
    w.add_argument("--mtp-acceptance", type=_fraction, default=0.8, help="MTP draft acceptance rate")
    w.add_argument("--no-mtp", action="store_true", help="plain decoding, one token per sequence per step")
    w.add_argument("--weights", default="fp8", choices=["fp8", "bf16"], help="linear-layer weight format")
    w.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp8"])
    w.add_argument("--schedule", default="auto", choices=["auto", *SCHEDULES],
                   help="auto: sbo for ScMoE, tbo for the baselines (the report's pairing)")
    w.add_argument("--usd-per-gpu-hour", type=_positive(float), default=2.0)
    o = p.add_argument_group("output")
    o.add_argument("--plot", metavar="PATH.png", help="write TPOT vs sequences per GPU for the three models")
    o.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="JSON instead of tables (to stdout, or to PATH with the tables still printed)")
    return p


def _cluster(args):
    us = lambda v: None if v is None else v * 1e-6  # noqa: E731
    scale = lambda v, k: None if v is None else v * k  # noqa: E731
    return get_cluster(args.cluster, bf16_flops=scale(args.peak_bf16_tflops, 1e12),
                       fp8_flops=scale(args.peak_fp8_tflops, 1e12), hbm_bw=scale(args.hbm_tbs, 1e12),
                       hbm_bytes=scale(args.hbm_gb, 1e9), nvlink_bw=scale(args.nvlink_gbs, 1e9),
                       rdma_bw=scale(args.rdma_gbs, 1e9), nvlink_latency=us(args.nvlink_latency_us),
                       rdma_latency=us(args.rdma_latency_us), gpus_per_node=args.gpus_per_node)


def _efficiency(args):
    return EFFICIENCY_PROFILES[args.efficiency].replace(
        hbm=args.eff_hbm, gemm=args.eff_gemm, attention=args.eff_attention, network=args.eff_network,
        op_overhead=None if args.op_overhead_us is None else args.op_overhead_us * 1e-6)


def _specs(args):
    specs = []
    if args.model == "config":
        stem = os.path.splitext(os.path.basename(args.config))[0]
        name = "LongCat-Flash" if stem == "longcat_flash" else f"lcflash:{stem}"
        specs.append(from_lcflash(model_config(load_config(args.config)), name=name))
    else:
        specs.append(BASELINES[args.model]())
    if args.compare:
        specs += [f() for k, f in BASELINES.items() if k != args.model]
    return specs


def _workload(args, batch=None):
    return Workload(batch_per_gpu=args.batch_per_gpu if batch is None else batch, context=args.context,
                    ep=args.ep, tp=args.tp, mtp=not args.no_mtp, mtp_acceptance=args.mtp_acceptance,
                    weight_dtype=args.weights, kv_dtype=args.kv_dtype)


def _is_report_scenario(args) -> bool:
    return (args.cluster == REPORT_SCENARIO["cluster"] and args.ep == REPORT_SCENARIO["ep"]
            and args.batch_per_gpu == REPORT_SCENARIO["batch_per_gpu"] and not args.no_mtp
            and abs(args.mtp_acceptance - REPORT_SCENARIO["mtp_acceptance"]) < 1e-9)


def _result_dict(spec, est, args):
    rep = REPORT.get(spec.name) if _is_report_scenario(args) else None
    usd_scale = args.usd_per_gpu_hour / REPORT_SCENARIO["usd_per_gpu_hour"]
    return dict(
        model=spec.name, source=spec.source, schedule=est.schedule, variant=est.variant,
        step_ms=est.step_seconds * 1e3, tpot_ms=est.tpot_seconds * 1e3,
        expected_tokens_per_step=est.expected_tokens, tokens_per_s_per_gpu=est.tokens_per_s_per_gpu,
        usd_per_million_output_tokens=est.usd_per_million_tokens(args.usd_per_gpu_hour),
        schedule_step_ms={k: v * 1e3 for k, v in est.schedule_seconds.items()},
        overlap_bound_step_ms={k: v * 1e3 for k, v in est.overlap_bound_seconds.items()},
        resource_busy_ms={k: v * 1e3 for k, v in est.resource_busy.items()},
        memory_gb={k: v / GB for k, v in est.memory.items()},
        report_tpot_ms=rep[0] if rep else None,
        report_usd_per_million=(rep[1] * usd_scale if rep and rep[1] is not None else None),
        activated_params_b=spec.activated_params() / 1e9, total_params_b=spec.param_counts()["total"] / 1e9,
        components=[dict(r, seconds_per_call_us=r["seconds_per_call"] * 1e6, total_us=r["total_seconds"] * 1e6,
                         critical_us=r["critical_seconds"] * 1e6) for r in est.components],
    )


def format_tables(results, args, cluster, eff) -> str:
    lines = []
    wl = _workload(args)
    lines.append(f"cluster {cluster.name}: {cluster.bf16_flops / 1e12:.0f}/{cluster.fp8_flops / 1e12:.0f} TFLOP/s "
                 f"bf16/fp8, HBM {cluster.hbm_bw / 1e12:.2f} TB/s {cluster.hbm_bytes / GB:.0f} GB, NVLink "
                 f"{cluster.nvlink_bw / GB:.0f} GB/s, RDMA {cluster.rdma_bw / GB:.0f} GB/s per GPU per direction")
    lines.append(f"efficiency {args.efficiency}: hbm {eff.hbm:.3g} gemm {eff.gemm:.3g} attention "
                 f"{eff.attention:.3g} network {eff.network:.3g} op overhead {eff.op_overhead * 1e6:.3g} us")
    lines.append(f"workload: EP={wl.ep} TP={wl.tp} {wl.batch_per_gpu:g} seq/GPU, context {wl.context}, "
                 + (f"MTP acceptance {wl.mtp_acceptance:.2f} ({wl.expected_tokens:.2f} tokens/step)" if wl.mtp
                    else "no MTP") + f", weights {wl.weight_dtype}, KV {wl.kv_dtype}")
    for r in results:
        lines.append("")
        lines.append(f"== {r['model']} ({r['total_params_b']:.1f}B total, {r['activated_params_b']:.1f}B "
                     f"activated/token): schedule {r['schedule']} [{r['variant']}]")
        lines.append(f"{'component':24s} {'calls':>5s} {'us/call':>9s} {'total us':>10s} {'critical us':>11s} "
                     f"{'MB/call':>9s} {'GFLOP/call':>10s}  bound")
        for c in r["components"]:
            lines.append(f"{c['name']:24s} {c['calls']:5d} {c['seconds_per_call_us']:9.1f} {c['total_us']:10.1f} "
                         f"{c['critical_us']:11.1f} {c['bytes_per_call'] / 1e6:9.2f} "
                         f"{c['flops_per_call'] / 1e9:10.2f}  {c['bound']}")
        sched = "  ".join(f"{k} {v:.2f}" for k, v in r["schedule_step_ms"].items())
        bound = "  ".join(f"{k} {v:.2f}" for k, v in r["overlap_bound_step_ms"].items() if k != "sequential")
        lines.append(f"step ms by schedule: {sched}   (perfect-overlap bound: {bound})")
        mem = r["memory_gb"]
        warn = "  ** exceeds HBM **" if mem["total"] > cluster.hbm_bytes / GB else ""
        lines.append(f"memory/GPU: weights {mem['weights']:.1f} GB + KV {mem['kv_cache']:.1f} GB = "
                     f"{mem['total']:.1f} GB of {cluster.hbm_bytes / GB:.0f} GB{warn}")
    lines.append("")
    lines.append(f"{'model':18s} {'sched':6s} {'step ms':>8s} {'TPOT ms':>8s} {'tok/s/GPU':>10s} "
                 f"{'$/1M out':>9s} {'report TPOT':>11s} {'report $':>9s}")
    for r in results:
        rt = f"{r['report_tpot_ms']:.1f}" if r["report_tpot_ms"] else "-"
        ru = f"{r['report_usd_per_million']:.2f}" if r["report_usd_per_million"] else "-"
        lines.append(f"{r['model']:18s} {r['schedule']:6s} {r['step_ms']:8.3f} {r['tpot_ms']:8.3f} "
                     f"{r['tokens_per_s_per_gpu']:10.0f} {r['usd_per_million_output_tokens']:9.3f} {rt:>11s} "
                     f"{ru:>9s}")
    lines.append(f"cost at ${args.usd_per_gpu_hour:g}/GPU-hour; TPOT = step / tokens per step")
    return "\n".join(lines)


def plot_tpot(path, specs, args, cluster, eff, batches=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = batches or [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec in specs:
        xs, ys, fits = [], [], []
        for b in batches:
            wl = _workload(args, batch=b)
            est = estimate_step(spec, cluster, wl, eff, args.schedule, all_schedules=False)
            xs.append(b)
            ys.append(est.tpot_seconds * 1e3)
            fits.append(est.memory["total"] <= cluster.hbm_bytes)
        line, = ax.plot(xs, ys, marker="o", ms=3, label=f"{spec.name} ({est.schedule})")
        over = [(x, y) for x, y, f in zip(xs, ys, fits) if not f]
        if over:
            ax.plot(*zip(*over), "x", color=line.get_color(), ms=6)
        rep = REPORT.get(spec.name)
        if rep and args.cluster == "h800" and args.ep == 128 and not args.no_mtp:
            ax.plot([96], [rep[0]], "*", ms=12, color=line.get_color(), markeredgecolor="k")
    ax.set_xlabel("sequences per GPU")
    ax.set_ylabel("TPOT (ms)")
    ax.set_xscale("log", base=2)
    ax.set_title(f"{cluster.name.upper()} EP={args.ep}, context {args.context}, "
                 + (f"MTP acc. {args.mtp_acceptance}" if not args.no_mtp else "no MTP")
                 + f", {args.efficiency} efficiency", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="star: report value; x: exceeds HBM", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _meta(argv):
    try:
        import matplotlib
        mpl = matplotlib.__version__
    except ImportError:
        mpl = None
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(device="none: analytical model, nothing measured",
                date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python -m lcflash.perfmodel " + " ".join(argv), python=platform.python_version(),
                matplotlib=mpl, lcflash_git_commit=commit, host=platform.node())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot and not args.plot.lower().endswith(".png"):
        parser.error(f"--plot={args.plot!r}: the plot is a PNG; give a path ending in .png")
    try:
        cluster, eff = _cluster(args), _efficiency(args)
        specs = _specs(args)
        results = [_result_dict(s, estimate_step(s, cluster, _workload(args), eff, args.schedule), args)
                   for s in specs]
    except (ConfigError, WorkloadError, HardwareError, ValueError) as err:
        parser.error(str(err))
    payload = dict(meta=_meta(argv), cluster=dataclasses.asdict(cluster), efficiency=dataclasses.asdict(eff),
                   efficiency_profile=args.efficiency, workload=dataclasses.asdict(_workload(args)),
                   usd_per_gpu_hour=args.usd_per_gpu_hour, results=results)
    if args.json == "-":
        print(json.dumps(payload, indent=1))
    else:
        print(format_tables(results, args, cluster, eff))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(payload, f, indent=1)
            print(f"wrote {args.json}")
    if args.plot:
        plot_specs = specs if args.compare else specs + [f() for k, f in BASELINES.items() if k != args.model]
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot_tpot(args.plot, plot_specs, args, cluster, eff)
        if args.json != "-":
            print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
