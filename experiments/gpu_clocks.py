"""The GPU's SM clock and board power, sampled by `nvidia-smi` while a benchmark runs.

An H100 or H200 SXM board holds its 700 W cap by lowering the SM clock. A training step of configs/small.py at
32 x 1024 reaches the cap about a second into sustained work and then runs at ~1,680 MHz, while a kernel timed
in short bursts (bench_moe_gemm.py's 20 ms batches) stays at the 1,980 MHz maximum (experiments/HISTORY.md,
session 25). Benchmarks record the clock they ran at, so that their figures compare.

    with ClockSampler() as clocks:
        ...  # timed work
    clocks.summary  # None where there is no nvidia-smi (CPU machines)

Run as a script, it measures the rooflines both ways: an 8192^3 bf16 matmul and a 2 GiB copy, each timed in a
0.25 s burst from idle and then back to back for `--seconds`, with the clock and power of each window:

    python experiments/gpu_clocks.py [--seconds 6] [--out experiments/gpu_clocks.json]
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

# Older spelling of clocks_event_reasons.*; both are accepted by the drivers on the GPU image.
QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap"


def summarize(lines) -> dict | None:
    """Parses `nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits` lines ("1695, 690.49, Active"; the first
    GPU's row where several are listed, as the lines come) into clock and power statistics; None without
    samples."""
    clock, power, capped = [], [], []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            clock.append(float(parts[0]))
            power.append(float(parts[1]))
        except ValueError:  # "[N/A]" or a header
            continue
        capped.append(parts[2] == "Active")
    if not clock:
        return None
    return {"samples": len(clock), "sm_clock_mhz_mean": round(statistics.fmean(clock), 1),
            "sm_clock_mhz_min": min(clock), "sm_clock_mhz_max": max(clock),
            "power_w_mean": round(statistics.fmean(power), 1), "power_w_max": max(power),
            "power_capped_share": round(sum(capped) / len(capped), 3)}


class ClockSampler:
    """Samples every `period_ms` between __enter__ and __exit__; `summary` is summarize()'s dict, or None where
    nvidia-smi is missing or gave nothing (the GPU may be too briefly busy for a sample)."""

    def __init__(self, period_ms: int = 50, gpu: int = 0):
        self.period_ms, self.gpu = period_ms, gpu
        self.summary = None
        self._proc = None

    def __enter__(self):
        exe = shutil.which("nvidia-smi")
        if exe:
            self._proc = subprocess.Popen(
                [exe, f"--id={self.gpu}", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                 f"--loop-ms={self.period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate(timeout=10)
            self.summary = summarize(out.splitlines())
        return False


def _rate(fn, args, work: float, seconds: float, settle_s: float = 0.0) -> dict:
    """work / s of fn(*args) run back to back for `seconds` (after `settle_s` more, untimed, under the sampler),
    with the clocks of the timed window. Calls are synced every ~20 ms, so the queue stays short."""
    import jax

    jax.block_until_ready(fn(*args))  # compiled and warm
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    per_sync = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))

    def run(duration):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration:
            jax.block_until_ready([fn(*args) for _ in range(per_sync)])
            n += per_sync
        return n, time.perf_counter() - start

    run(settle_s)
    with ClockSampler(period_ms=20) as clocks:
        n, dt = run(seconds)
    return {"rate": work * n / dt, "calls": n, "seconds": round(dt, 3), "clocks": clocks.summary}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0, help="the sustained window (after 2 s to settle)")
    ap.add_argument("--idle_s", type=float, default=5.0, help="pause before each burst, so the board cools")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_clocks.json"))
    args = ap.parse_args()
    if args.seconds <= 0 or args.idle_s < 0:
        ap.error(f"--seconds {args.seconds} must be > 0 and --idle_s {args.idle_s} >= 0")
    import jax
    import jax.numpy as jnp

    n = 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    x = jnp.ones((1 << 30,), jnp.bfloat16)  # 2 GiB
    cases = {"matmul_8192_tflops": (jax.jit(jnp.dot), (a, b), 2 * n**3 / 1e12),
             "copy_gbs": (jax.jit(lambda v: v + 1), (x,), 2 * x.size * 2 / 1e9)}   # bytes read + written
    rows = []
    for name, (fn, fargs, work) in cases.items():
        time.sleep(args.idle_s)
        burst = _rate(fn, fargs, work, 0.25)   # from idle: the clock of a short timing loop
        sustained = _rate(fn, fargs, work, args.seconds, settle_s=2.0)
        rows.append({"case": name, "burst": burst, "sustained": sustained})
    dev = jax.devices()[0]
    out = {"device": f"{dev.platform}: {dev.device_kind}",
           "versions": {"python": platform.python_version(), "jax": jax.__version__},
           "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), "results": rows}
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"{out['device']}  (jax {jax.__version__})")
    print(f"{'case':>20} {'burst':>9} {'MHz':>6} {'sustained':>10} {'MHz':>6} {'W mean':>7} {'capped':>7}")
    for r in rows:
        bc, sc = r["burst"]["clocks"] or {}, r["sustained"]["clocks"] or {}
        print(f"{r['case']:>20} {r['burst']['rate']:9.1f} {bc.get('sm_clock_mhz_mean', float('nan')):6.0f} "
              f"{r['sustained']['rate']:10.1f} {sc.get('sm_clock_mhz_mean', float('nan')):6.0f} "
              f"{sc.get('power_w_mean', float('nan')):7.0f} {sc.get('power_capped_share', float('nan')):7.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
