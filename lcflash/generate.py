"""Generate text from a checkpoint.

    python -m lcflash.generate --checkpoint=DIR --prompt="Once upon a time" [--prompt=...] [--max_new_tokens=64]
        [--temperature=0] [--top_p=1] [--seed=0] [--speculative=mtp] [--attn_impl=absorbed|pallas|expanded]
        [--dtype=float32|bfloat16] [--tokenizer=tokenizer.json] [--step=N] [--stats] [--mesh=expert=8,tensor=2]

DIR is a HF directory (config.json + safetensors) or a trainer workdir (`python -m lcflash.train --workdir=DIR`,
its checkpoints/ directory, or one step directory). Tokens are bytes (0 pad, 1 bos, 2 eos, byte b -> b + 3) unless
a tokenizer.json is given, found in the HF directory, or named by the run's `data.tokenizer`. Each prompt is
prefixed with bos; generation stops at eos. --mesh spreads the model over the devices (axes data, fsdp, expert,
tensor; one size may be -1, the rest): each weight is read straight onto its shards (lcflash/infer/load.py).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lcflash.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speculative", default="none", choices=("none", "mtp"))
    ap.add_argument("--attn_impl", default="absorbed", choices=("absorbed", "pallas", "expanded"))
    ap.add_argument("--dtype", default=None, help="parameter and compute dtype (default: the checkpoint's)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json; '' forces byte tokens")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir (default: newest)")
    ap.add_argument("--no_bos", action="store_true", help="do not prefix prompts with bos")
    ap.add_argument("--stats", action="store_true", help="print generation statistics as JSON on stderr")
    ap.add_argument("--mesh", default="", help="device mesh to shard the model over, e.g. 'expert=4,tensor=2' "
                                               "(default: one device)")
    args = ap.parse_args(argv)

    from lcflash.config import ConfigError
    from lcflash.data.tokenize import DataError, make_tokenizer
    from lcflash.infer.generation import GenerateError, generate
    from lcflash.infer.load import load_model, mesh_from_spec

    try:
        mesh = mesh_from_spec(args.mesh) if args.mesh else None
        model, tok_spec = load_model(args.checkpoint, args.dtype, args.step, mesh=mesh)
        cfg = model.cfg
        tokenizer = make_tokenizer(tok_spec if args.tokenizer is None else args.tokenizer, cfg.vocab_size,
                                   cfg.bos_token_id, cfg.eos_token_id)
        prompts = []
        for text in args.prompt:
            ids = [int(i) for i in tokenizer.encode(text.encode("utf-8"))]
            prompts.append(ids if args.no_bos else [tokenizer.bos_id] + ids)
        out, stats = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed, eos_id=tokenizer.eos_id,
                              speculative=None if args.speculative == "none" else args.speculative,
                              attn_impl=args.attn_impl, return_stats=True)
    except (ConfigError, DataError, GenerateError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for text, prompt, row in zip(args.prompt, prompts, out):
        new = [int(t) for t in row[len(prompt):]]
        if tokenizer.eos_id in new:
            new = new[:new.index(tokenizer.eos_id)]
        print(text + tokenizer.decode(new).decode("utf-8", errors="replace"))
    if args.stats:
        print(json.dumps(stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
