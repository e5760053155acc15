"""The d_rhs (contract) kernel's tilings against each other, and a switch's effect on the whole expert product.

Two modes, both in rotated rounds (bench_moe_gemm.rotated_rounds) on one machine:

  kernel (default): the d_rhs kernel alone at each case (config/proj/T[/load], equal groups unless a load is named:
    skewed or a Dirichlet alpha, as bench_moe_gemm.group_sizes deals them), bf16 output as the model's
    backward writes it, in each tiling variant: the default (`pallas_gmm._chain_tiles` of the shapes) with
    overrides of mk.Tiles fields, e.g. `default,stages=3,band=4,stages=4+band=4,overlap_mma=1`; against a bf16
    batched einsum (the bound). Every variant's output must equal the first's bit for bit (same sums).
  --gmm-switch NAME=A,B: the table's forward and backward (bench_moe_gemm.run_case, pallas_chain and the einsum)
    with the module switch NAME (pallas_gmm.X or mgpu_kernels.X) at A and at B, alternating, `--rounds` each;
    the ratios to the einsum and to the bytes floor; with --device-time also from the device's busy time per call
    (a profiler trace), which resolves products of tens of microseconds where wall time cannot. Repeated, the
    switches are set together: `--gmm-switch CONTRACT_STAGES=4,3 --gmm-switch CONTRACT_BAND=4,2` puts (4, 4)
    against (3, 2).

    python experiments/contract_ab.py --cases longcat/down/4096,longcat/down/512 --variants default,stages=3,band=4
    python experiments/contract_ab.py --cases longcat/down/4096 --gmm-switch CONTRACT_BAND=0,4 --rounds 2

Session 44 (one H100) ran these as inline scripts of the same code (experiments/HISTORY.md, session 44).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_moe_gemm as bench  # noqa: E402
from lcflash.kernels.gmm import mgpu_kernels as mk  # noqa: E402
from lcflash.kernels.gmm import pallas_gmm  # noqa: E402


def parse_load(text: str):
    """'balanced' | 'skewed' | a Dirichlet alpha > 0 (bench_moe_gemm.group_sizes' loads), else None."""
    if text in ("balanced", "skewed"):
        return text
    try:
        alpha = float(text)
    except ValueError:
        return None
    return alpha if alpha > 0 else None


def parse_case(text: str) -> tuple[str, str, int, str | float]:
    """'config/proj/T[/load]' -> (config, proj, T, load); load balanced (default), skewed or a Dirichlet alpha."""
    parts = text.split("/")
    load = parse_load(parts[3]) if len(parts) == 4 else "balanced"
    if (len(parts) not in (3, 4) or (parts[0], parts[1]) not in bench.SHAPES or not parts[2].isdigit()
            or int(parts[2]) < 1 or load is None):
        raise ValueError(f"case {text!r}: want config/proj/T[/load] with (config, proj) in {sorted(bench.SHAPES)}, "
                         "T >= 1, load balanced (default), skewed or a Dirichlet alpha > 0")
    return parts[0], parts[1], int(parts[2]), load


def parse_variant(text: str) -> dict:
    """'default' -> {}; 'stages=3+band=4' -> {'stages': 3, 'band': 4}; 'overlap_mma=1' -> {'overlap_mma': True}
    (the integer and boolean mk.Tiles fields)."""
    if text == "default":
        return {}
    kinds = {f.name: bool if f.type in (bool, "bool") else int
             for f in dataclasses.fields(mk.Tiles) if f.type in (int, "int", bool, "bool")}
    out = {}
    for item in text.split("+"):
        key, _, value = item.partition("=")
        if key not in kinds or not value.lstrip("-").isdigit():
            raise ValueError(f"variant {text!r}: want 'default' or field=int joined by '+', fields {sorted(kinds)}")
        out[key] = kinds[key](int(value))
    return out


def variant_tiles(k: int, n: int, rows_per_group: int, fields: dict) -> mk.Tiles:
    """The d_rhs kernel's flat tiles at K = k, N = n with bf16 output, as contract_matmul picks them unpinned, then
    `fields`."""
    if pallas_gmm.CONTRACT_TILES is not None:
        raise ValueError(f"variant_tiles builds on the unpinned tiles; CONTRACT_TILES = {pallas_gmm.CONTRACT_TILES}")
    return dataclasses.replace(pallas_gmm.flat_contract_tiles(n, jnp.bfloat16, rows_per_group, k=k), **fields)


def kernel_ab(cases, variants: dict, rounds: int) -> list:
    out = []
    for config, proj, t, load in cases:
        k, n, g = bench.SHAPES[(config, proj)]
        m = g * t
        keys = jax.random.split(jax.random.key(t + k), 2)
        x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
        dy = jax.random.normal(keys[1], (m, n), jnp.bfloat16)
        sizes = jnp.asarray(bench.group_sizes(g, t, load), jnp.int32)
        tiles_of = {name: variant_tiles(k, n, t, fields) for name, fields in variants.items()}  # before any is pinned
        fns, got = {}, {}
        try:
            for name in variants:
                pallas_gmm.CONTRACT_TILES = tiles_of[name]  # read when traced
                fns[name] = jax.jit(lambda a, d, s: pallas_gmm.contract_matmul(a, d, s, out_dtype=jnp.bfloat16,
                                                                               chain=True))
                got[name] = np.asarray(fns[name](x, dy, sizes), np.float32)
        finally:
            pallas_gmm.CONTRACT_TILES = None
        fns["einsum"] = jax.jit(lambda a, d, s: jnp.einsum("gtk,gtn->gkn", a.reshape(g, t, k), d.reshape(g, t, n)))
        times = bench.rotated_rounds(fns, (x, dy, sizes), rounds)
        first = next(iter(variants))
        rec = dict(config=config, proj=proj, tokens_per_expert=t, load=load, K=k, N=n, G=g, ms=times,
                   per_einsum={v: float(np.median(times["einsum"]) / np.median(ts)) for v, ts in times.items()},
                   tiles={v: str(tl) for v, tl in tiles_of.items()},
                   bitwise_equal=all(np.array_equal(got[first], a) for a in got.values()))
        print("contract_ab", json.dumps(rec), flush=True)
        out.append(rec)
    return out


def switch_home(name: str):
    for module in (pallas_gmm, mk):
        if hasattr(module, name) and name.isupper() and not name.startswith("_"):  # public module constants
            return module
    raise ValueError(f"gmm switch {name!r}: not a switch of pallas_gmm or mgpu_kernels")


def parse_switch(text: str):
    """'NAME=A[,B,...]' -> (NAME, [A, B, ...]): a module switch of pallas_gmm or mgpu_kernels and its values (ints,
    True / False or strings), each of the type of the switch's default (also bench_train.py's --gmm_switch)."""
    name, _, values = text.partition("=")
    default = getattr(switch_home(name), name)
    if not isinstance(default, (int, str)):  # e.g. the pinned Tiles (contract_ab.py's --variants sets those)
        raise ValueError(f"gmm switch {text!r}: {name} holds a {type(default).__name__}, not an int, bool or string")
    texts = values.split(",")
    if not all(texts):
        raise ValueError(f"gmm switch {text!r}: want NAME=A[,B,...]")
    parsed = [int(v) if v.lstrip("-").isdigit() else {"True": True, "False": False}.get(v, v) for v in texts]
    wrong = [v for v in parsed if type(v) is not type(default)]
    if wrong:
        raise ValueError(f"gmm switch {text!r}: {name} is a {type(default).__name__} (default {default!r}); "
                         f"got {wrong}")
    return name, parsed


def gmm_switch_ab(cases, switches: dict, rounds: int, bw_gbs: float, device_time: bool = False) -> list:
    """switches: NAME -> values, set together (setting i takes each switch's i-th value), in rotated rounds."""
    homes = {name: switch_home(name) for name in switches}
    defaults = {name: getattr(home, name) for name, home in homes.items()}
    settings = list(zip(*switches.values()))
    out = []
    try:
        for config, proj, t, load in cases:
            for r in range(rounds):
                for setting in settings if r % 2 == 0 else settings[::-1]:
                    for (name, home), value in zip(homes.items(), setting):
                        setattr(home, name, value)
                    row = bench.run_case(config, proj, t, load, ["pallas_chain", "einsum"], bw_gbs, [],
                                         check=False, device_time=device_time)
                    if load != "balanced":  # the bound is the einsum on equal groups (run_case skips it here)
                        row["impls"]["einsum"] = bench.run_case(config, proj, t, "balanced", ["einsum"], bw_gbs, [],
                                                                check=False, device_time=device_time)["impls"]["einsum"]
                    ours, ein = row["impls"]["pallas_chain"], row["impls"]["einsum"]
                    rec = dict(config=config, proj=proj, tokens_per_expert=t, load=load, round=r,
                               switch="+".join(switches),
                               value=setting[0] if len(setting) == 1 else list(setting))
                    for clock, key in itertools.product(("", "_device") if device_time else ("",), ("fwd", "bwd")):
                        mine, bound = ours[f"{key}{clock}_ms"], ein[f"{key}{clock}_ms"]
                        floor = row[f"bytes_floor_{key}_ms"]
                        rec.update({f"{key}{clock}_ms": mine, f"einsum_{key}{clock}_ms": bound,
                                    f"{key}{clock}_per_einsum": bound / mine, f"{key}{clock}_per_floor": mine / floor,
                                    f"einsum_{key}{clock}_per_floor": bound / floor})
                    if device_time:
                        rec["kernels_us"] = {f"{impl}_{key}": timed.get(f"{key}_device_kernels_us")
                                             for impl, timed in (("ours", ours), ("einsum", ein))
                                             for key in ("fwd", "fwdbwd")}
                    print("gmm_switch_ab", json.dumps(rec), flush=True)
                    out.append(rec)
    finally:
        for name, home in homes.items():
            setattr(home, name, defaults[name])
    return out


def parse_switches(texts) -> dict:
    """['A=1,2', 'B=x,y'] -> {'A': [1, 2], 'B': ['x', 'y']}: switches set together, so of equal lengths."""
    switches = dict(parse_switch(t) for t in texts)
    if len(switches) < len(texts):
        raise ValueError(f"--gmm-switch {texts}: a switch named twice")
    if len({len(v) for v in switches.values()}) > 1:
        raise ValueError(f"--gmm-switch {texts}: switches set together need as many values each")
    return switches


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="longcat/down/4096,longcat/gate_up/4096,longcat/down/512,longcat/gate_up/512",
                    help="config/proj/T[/load], comma-separated; load balanced (default), skewed or a Dirichlet alpha")
    ap.add_argument("--variants", default="default,stages=3,band=4", help="kernel mode's tilings (see above)")
    ap.add_argument("--gmm-switch", action="append", default=[], metavar="NAME=A,B",
                    help="the whole product with a switch at A, B, ...; repeated, switches set together")
    ap.add_argument("--device-time", action="store_true", help="--gmm-switch also records the device's busy "
                    "time per call from a profiler trace (bench_moe_gemm.device_ms; for products of tens of us)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="experiments/contract_ab.json")
    args = ap.parse_args()
    try:
        cases = [parse_case(c) for c in args.cases.split(",")]
        variants = {v: parse_variant(v) for v in args.variants.split(",")}
        switches = parse_switches(args.gmm_switch)
    except ValueError as e:
        ap.error(str(e))
    if args.device_time and not args.gmm_switch:
        ap.error("--device-time: only --gmm-switch records the device's time (the kernel mode times by wall clock)")
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: must be at least 1")
    dev = jax.devices()[0]
    meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv), **pallas_gmm.tiling_settings())
    print(json.dumps(meta), flush=True)
    if args.gmm_switch:
        results = gmm_switch_ab(cases, switches, args.rounds, bench.measure_bandwidth_gbs(), args.device_time)
    else:
        results = kernel_ab(cases, variants, args.rounds)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
