"""Checks, in a compiled (scheduled) HLO module, that the ScMoE transfers can overlap the dense path.

The layer marks its parts with named scopes (`moe_dispatch`, `mlp_0`, `attn_1`, `mlp_1`, `moe_combine`),
which survive into each instruction's `op_name`. Two checks on the computation that holds the layer:

* independence (any backend): no matmul of dense FFN 0, attention 1 or dense FFN 1 is an ancestor or a
  descendant of the dispatch or combine all-to-all, so a scheduler is free to run them concurrently;
* enclosure (backends with asynchronous all-to-all, e.g. XLA:GPU): in the schedule, the dispatch's
  start/done pair encloses at least one matmul of that window.

    python -m lcflash.parallel.hlo_check --config=configs/tiny.py --config.mesh.expert=8 [--batch=8 --seq=64]

compiles the sharded forward for the local devices and prints the report (see docs/distributed.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

WINDOW = ("mlp_0", "attn_1", "mlp_1")


@dataclass
class Instr:
    name: str
    opcode: str
    operands: list[str]
    op_name: str
    calls: list[str] = field(default_factory=list)


def _match_paren(s: str, i: int) -> int:
    depth = 0
    for j in range(i, len(s)):
        if s[j] in "([{":
            depth += 1
        elif s[j] in ")]}":
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced HLO text near {s[i:i + 80]!r}")


def _parse_instr(line: str) -> Instr | None:
    m = re.match(r"\s*(?:ROOT\s+)?(%[\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        rest = rest[_match_paren(rest, 0) + 1:].lstrip()
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else ""
    om = re.match(r"([\w\-]+)\(", rest)
    if not om:
        return None
    close = _match_paren(rest, om.end() - 1)
    operands = re.findall(r"%[\w.\-]+", rest[om.end():close])
    attrs = rest[close + 1:]
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    calls = re.findall(r"(?:calls|to_apply|body|condition)=(%[\w.\-]+)", attrs)
    calls += [c for group in re.findall(r"called_computations=\{([^}]*)\}", attrs) for c in re.findall(r"%[\w.\-]+", group)]
    return Instr(m.group(1), om.group(1), operands, op_name.group(1) if op_name else "", calls)


def parse_module(text: str) -> dict[str, list[Instr]]:
    """Computation name -> instructions in schedule order (the order of the text in a scheduled module)."""
    comps: dict[str, list[Instr]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?(%[\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            comps[current] = []
            continue
        if current is not None and line.startswith(" "):
            ins = _parse_instr(line)
            if ins is not None:
                comps[current].append(ins)
        elif line.startswith("}"):
            current = None
    return comps


def _is_a2a(ins: Instr, comps) -> bool:
    if ins.opcode.startswith("all-to-all"):
        return True
    if ins.opcode in ("async-start", "async-done"):
        return any(i.opcode.startswith("all-to-all") for c in ins.calls for i in comps.get(c, []))
    return False


def _is_matmul(ins: Instr, comps) -> bool:
    if ins.opcode in ("dot", "convolution") or (ins.opcode == "custom-call" and "dot" in ins.op_name):
        return True
    if ins.opcode == "fusion":
        return any(i.opcode in ("dot", "convolution") for c in ins.calls for i in comps.get(c, []))
    return False


def _closure(start: str, edges: dict[str, list[str]]) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for n in edges.get(stack.pop(), []):
            if n not in seen:
                seen.add(n)
                stack.append(n)
    return seen


@dataclass
class OverlapReport:
    computation: str
    dispatch: list[str]          # all-to-all instructions (or async start/done) of the dispatch
    combine: list[str]
    window_matmuls: dict[str, list[str]]
    dependent: list[str]         # window matmuls that depend on / feed a transfer (must be empty)
    asynchronous: bool           # the dispatch all-to-all is a start/done pair
    enclosed: dict[str, int]     # window part -> matmuls scheduled between dispatch start and done

    def summary(self) -> str:
        lines = [f"computation {self.computation}",
                 f"  dispatch all-to-all: {self.dispatch}", f"  combine all-to-all: {self.combine}",
                 "  window matmuls: " + ", ".join(f"{k}={len(v)}" for k, v in self.window_matmuls.items()),
                 f"  independent of the transfers: {not self.dependent}" + (f" (dependent: {self.dependent})"
                                                                             if self.dependent else ""),
                 f"  asynchronous all-to-all: {self.asynchronous}"]
        if self.asynchronous:
            lines.append("  matmuls between dispatch start and done: "
                         + ", ".join(f"{k}={v}" for k, v in self.enclosed.items()))
        return "\n".join(lines)


def overlap_report(hlo_text: str) -> OverlapReport:
    comps = parse_module(hlo_text)
    for cname, instrs in comps.items():
        dispatch = [i for i in instrs if _is_a2a(i, comps) and "moe_dispatch" in i.op_name]
        combine = [i for i in instrs if _is_a2a(i, comps) and "moe_combine" in i.op_name]
        if not dispatch or not combine:
            continue
        window = {w: [i for i in instrs if f"/{w}/" in i.op_name and _is_matmul(i, comps)] for w in WINDOW}
        users: dict[str, list[str]] = {}
        for i in instrs:
            for o in i.operands:
                users.setdefault(o, []).append(i.name)
        defs = {i.name: i.operands for i in instrs}
        transfer = [i.name for i in dispatch + combine]
        related = set()
        for t in transfer:
            related |= _closure(t, users) | _closure(t, defs)
        dependent = [i.name for v in window.values() for i in v if i.name in related]
        pos = {i.name: k for k, i in enumerate(instrs)}
        starts = [i for i in dispatch if i.opcode.endswith("-start")]
        start_names = {i.name for i in starts}
        # A done may carry no metadata of its own: it is the one that consumes a dispatch start.
        dones = [i for i in instrs if i.opcode.endswith("-done") and start_names & set(i.operands)]
        asynchronous = bool(starts and dones)
        enclosed = {}
        if asynchronous:
            lo, hi = min(pos[i.name] for i in starts), max(pos[i.name] for i in dones)
            enclosed = {w: sum(lo < pos[i.name] < hi for i in v) for w, v in window.items()}
        return OverlapReport(cname, [i.name for i in dispatch], [i.name for i in combine],
                             {w: [i.name for i in v] for w, v in window.items()}, dependent, asynchronous, enclosed)
    raise ValueError("no computation holds both a moe_dispatch and a moe_combine all-to-all: is the model sharded "
                     "with an expert axis > 1 and transport all_to_all / ragged_all_to_all?")


def compile_sharded_forward(cfg, batch: int, seq: int):
    """Compiled sharded forward of the config's model on the local devices (random weights, no data)."""
    import jax
    import numpy as np
    from flax import nnx

    from lcflash.config import model_config
    from lcflash.model import LongcatFlash
    from lcflash.parallel.mesh import make_mesh, parallel_context
    from lcflash.parallel.sharding import create_sharded, shard_batch, sharded

    model_cfg = model_config(cfg)
    ctx = parallel_context(cfg, make_mesh(cfg), model_cfg, batch)
    model = create_sharded(lambda: LongcatFlash(model_cfg, nnx.Rngs(0)), ctx)
    graphdef, state = nnx.split(model)
    tokens = shard_batch(np.zeros((batch, seq), np.int32), ctx)
    fwd = jax.jit(sharded(lambda st, t: nnx.merge(graphdef, st).forward(t).logits, ctx))
    return fwd.lower(state, tokens).compile()


def main(argv=None) -> int:
    import sys

    from absl import flags
    from ml_collections import config_flags

    fl = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "ml_collections config file", flag_values=fl)
    batch = flags.DEFINE_integer("batch", 8, "global batch", flag_values=fl)
    seq = flags.DEFINE_integer("seq", 64, "sequence length", flag_values=fl)
    if argv is not None:     # config_flags registers --config.* overrides from sys.argv
        sys.argv = [sys.argv[0]] + list(argv)
    fl(sys.argv)
    compiled = compile_sharded_forward(config.value, batch.value, seq.value)
    print(overlap_report(compiled.as_text()).summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
