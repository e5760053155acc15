"""MTP speculative decoding on a trained checkpoint: acceptance rate and end-to-end speed-up.

    python experiments/mtp_acceptance.py --checkpoint=WORKDIR [--prompts=16] [--prompt_len=128] [--new=128]
        [--json=experiments/mtp_acceptance.json]

Two acceptance figures, both on the run's held-out split (`data` section of WORKDIR/config.json):
* teacher-forced: on real text, how often the MTP draft for token t+2 (from h_t and the true token t+1) equals
  the main model's greedy choice for token t+2 (from the true prefix). Independent of what greedy generates.
* generation: speculative greedy decoding (`generate(..., speculative="mtp")`) from held-out prompts; drafts
  accepted / drafts made. Its output is checked to equal plain greedy decoding. A small model's greedy output
  often loops, which inflates this figure; the teacher-forced one does not have that bias.
Speed-up: wall time of plain greedy vs speculative generate, same prompts, after a warm-up call of each; for
the whole batch of prompts and for the first prompt alone (batch 1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="trainer workdir (or a checkpoint step directory)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--teacher_len", type=int, default=512)
    ap.add_argument("--attn_impl", default="absorbed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lcflash.config import model_config
    from lcflash.data.corpus import load_corpus
    from lcflash.infer.generation import generator_for
    from lcflash.infer.load import _workdir_of, load_model
    from lcflash.train.trainer import load_workdir_config

    model, _ = load_model(args.checkpoint)
    workdir = _workdir_of(args.checkpoint)
    cfg = load_workdir_config(workdir)
    corpus = load_corpus(cfg.data, model_config(cfg))
    val = corpus.val
    rng = np.random.default_rng(args.seed)
    need = max(args.teacher_len, args.prompt_len) + 1
    starts = rng.integers(0, len(val) - need, args.prompts)

    # Teacher-forced agreement.
    toks = jnp.asarray(np.stack([val[s:s + args.teacher_len] for s in starts]).astype(np.int32))
    graphdef, state = nnx.split(model)

    @jax.jit
    def predict(state, toks):
        m = nnx.merge(graphdef, state)
        out = m.forward(toks)
        return jnp.argmax(out.logits, -1), jnp.argmax(m.mtp_logits(out.hidden[:, :-1], toks[:, 1:]), -1)

    main_pred, mtp_pred = (np.asarray(x) for x in predict(state, toks))
    truth = np.asarray(toks)
    teacher = float(np.mean(mtp_pred == main_pred[:, 1:]))
    main_acc = float(np.mean(main_pred[:, :-1] == truth[:, 1:]))
    mtp_acc = float(np.mean(mtp_pred[:, :-1] == truth[:, 2:]))
    print(f"teacher-forced: agreement {teacher:.4f}, main top-1 {main_acc:.4f}, MTP top-1 {mtp_acc:.4f}", flush=True)

    # Generation.
    prompts = [[int(t) for t in val[s:s + args.prompt_len]] for s in starts]
    gen = generator_for(model, args.attn_impl)
    eos = model.cfg.eos_token_id

    def timed(rows, **kw):
        gen.generate(rows, args.new, eos_id=eos, **kw)                 # warm-up (compiles)
        t = time.perf_counter()
        out = gen.generate(rows, args.new, eos_id=eos, **kw)
        return out, time.perf_counter() - t, dict(gen.last_stats)

    greedy, t_greedy, _ = timed(prompts)
    spec, t_spec, stats = timed(prompts, speculative="mtp")
    identical = all(list(a) == list(b) for a, b in zip(greedy, spec))
    print(f"batch {len(prompts)}: greedy {t_greedy:.3f}s, speculative {t_spec:.3f}s, acceptance "
          f"{stats['acceptance_rate']:.4f}, identical {identical}", flush=True)
    # Batch 1 (the latency case speculative decoding is for): the first prompt alone.
    greedy_1, t_greedy_1, _ = timed(prompts[:1])
    spec_1, t_spec_1, stats_1 = timed(prompts[:1], speculative="mtp")
    identical = identical and list(greedy_1[0]) == list(spec_1[0])
    result = {
        "checkpoint": os.path.abspath(args.checkpoint), "device": str(jax.devices()[0]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([sys.executable] + sys.argv), "jax": jax.__version__,
        "teacher_forced_agreement": teacher, "main_top1_accuracy": main_acc, "mtp_top1_accuracy": mtp_acc,
        "generation_acceptance": stats["acceptance_rate"], "drafts": stats["drafts"], "accepted": stats["accepted"],
        "iterations": stats["iterations"], "speculative_equals_greedy": identical,
        "greedy_seconds": t_greedy, "speculative_seconds": t_spec, "speedup": t_greedy / t_spec,
        "batch1_greedy_seconds": t_greedy_1, "batch1_speculative_seconds": t_spec_1,
        "batch1_speedup": t_greedy_1 / t_spec_1, "batch1_acceptance": stats_1["acceptance_rate"],
        "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
