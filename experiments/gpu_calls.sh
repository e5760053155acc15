#!/usr/bin/env bash
# GPU calls, one per device call (1, 2, 3 ran in session 35, 5 and 7 in 36; 4 and 6 wait on an attention kernel
# that gains alone; 10 (the L2 prefetch) and 11 ran in session 40; session 41 ran the in-kernel merge, the bands
# and the training MFU on an H100 (as calls 12, 15 and 16 of fb63435 / e9b2fcd; the merge is gone, and so are they);
# 13 times the bands again in rotated rounds, 14 reads the table with the bands 13 favours, 15 the training MFU
# with gradient accumulation, 8 and 9 (session 37's warpgroup split) wait; HISTORY.md):
#     bash experiments/gpu_calls.sh N [ATTN_PERSISTENT]      (N = 1 ... 15; 4 takes the persistent kernels,
#                                                            14 the rows and d_rhs bands)
# run from the repository root on the device machine, with `.whl` and `.whl-tokamax` carried (ml-collections,
# tensorboardX and tokamax 0.0.17 with its needs, which its image lacks). Results go to $OUT (or ./out). Each step
# has its own time limit, so a hang or a failure costs that step, not the call.
set -u
N=${1:?call number 1-15}
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl-tokamax/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export XLA_FLAGS=--xla_gpu_per_fusion_autotune_cache_dir=/tmp/atc
S=s36
T="python experiments/bench_train.py --gmm_impl pallas_chain --remat --warmup 2 --steps 3 --batch 32"  # calls 4, 6
step() {  # step LIMIT_S COMMAND...: run it, say how it ended
    local limit=$1; shift
    echo "=== $* (limit ${limit}s)"
    timeout "$limit" "$@"
    echo "=== rc=$?"
}
case $N in
1)  # tests: the persistent attention kernels bitwise against the grid ones, the fp32 checks, the peers
    step 200 python -m pytest -n 0 -q tests/test_doc_attention.py -k persistent
    step 150 python -m pytest -n 0 -q tests/test_train_attention.py -k fp32_as_closely
    step 120 python -m pytest -n 0 -q tests/test_gmm.py -k "peer or tokamax"
    ;;
2)  # attention alone: which kernels gain as persistent CTAs; tokamax's flash attention on the same documents
    step 560 python experiments/bench_attention.py --isolate --batch 32 --variants \
        dpa_mask,pallas,pallas_persistent,pallas_persistent_dkv,pallas_persistent_fwd,pallas_persistent_fwd_d1,pallas_persistent_dq,tokamax_docs \
        --out "$OUT/bench_attention_${S}_h200.json"
    ;;
3)  # decode: the fixed cost per kernel, per fused phase, the plain-load matvec; the batch-1 step's critical path
    step 240 python experiments/bench_decode_ops.py --sections=launch,phases,matvec --batches=1,8 \
        --json="$OUT/bench_decode_ops_${S}_h200.json"
    step 240 python experiments/bench_decode.py --part=jax --batches=1 --contexts=1024 --impls=pallas --rounds=1 \
        --no-speculative --no-dense_moe_rows --profile --dump_hlo --out_dir="$OUT" \
        --json="$OUT/bench_decode_${S}_h200.json"
    step 60 python experiments/decode_profile.py --hlo="$OUT/hlo_pallas_b1.txt" \
        --trace="$OUT/trace_decode_b1_pallas.json.gz" --steps=33 --json="$OUT/decode_profile_${S}_h200.json"
    ;;
4)  # training A/B in one call (machines differ by ~3%): the default, then the attention kernels that gained in
    # call 2 as persistent CTAs (second argument, e.g. fwd,dkv,dq)
    step 240 $T --profile_dir "$OUT/train_profile" --out "$OUT/bench_train_b32_${S}_default_h200.json"
    step 240 $T --attn_persistent "${2:?the kernels that gained in call 2, e.g. fwd,dkv}" \
        --out "$OUT/bench_train_b32_${S}_persistent_h200.json"
    ;;
6)  # training A/B in one call: the default against tokamax's flash attention (if tokamax_docs beat pallas in 2)
    step 240 $T --out "$OUT/bench_train_b32_${S}_default2_h200.json"
    step 240 $T --set model.train_attn_impl=tokamax --out "$OUT/bench_train_b32_${S}_tokamax_h200.json"
    ;;
5)  # the expert products against JAX's example kernel and tokamax's
    step 560 python experiments/bench_moe_gemm.py --impls pallas_chain,jax_mgpu,tokamax,einsum --pick-tokamax \
        --quick --out "$OUT/bench_moe_gemm_peers_${S}_h200.json"
    ;;
7)  # why the phase probe hung: its parts one by one, each in its own process (experiments/debug_phase_chain.py)
    for v in control sem1 sem_static sem_only min_nopf min_pf few_ctas; do
        step 25 python experiments/debug_phase_chain.py $v
    done
    ;;
8)  # session 37: the compute warpgroups on row halves of a tile (pallas_gmm.WG_SPLIT = "m", gmm_notes.md sessions
    # 37-38): GPU tests, then each split at LongCat's shapes and configs/small.py's training kernels
    step 150 python -m pytest -n 0 -q tests/test_gmm.py -k "row_split or gpu_pallas_forward or gpu_ffn or gpu_flat"
    for s in n m; do
        step 110 python experiments/bench_moe_gemm.py --impls pallas_chain,einsum --quick --wg-split $s \
            --out "$OUT/bench_moe_gemm_quick_wg${s}_s37_h200.json"
    done
    for s in n m; do
        step 70 python experiments/bench_moe_gemm.py --ffn-kernels 32768 --wg-split $s --no-ffn-einsum \
            --out "$OUT/bench_moe_gemm_ffnk_wg${s}_s37_h200.json"
    done
    # the row split's skip branch (session 38) costs nothing where no visit skips: equal groups, LongCat T=512
    step 80 python experiments/bench_moe_gemm.py --rows-ab flat,wgm,wgm_noskip \
        --out "$OUT/bench_moe_gemm_rowsab_s38_h200.json"
    ;;
9)  # JAX's example matmul with either split (the peer's answer to call 8's question); then, if call 8 showed the
    # row split faster, the training A/B
    step 100 python experiments/bench_wg_split.py --stages 4 --out "$OUT/bench_wg_split_s37_h200.json"
    step 240 $T --out "$OUT/bench_train_b32_s37_wgn_h200.json"
    step 240 $T --wg_split m --out "$OUT/bench_train_b32_s37_wgm_h200.json"
    ;;
11) # session 39: the main expert-GEMM table with ours and the einsum bound timed in 3 alternating rounds (the board
    # runs them at its power cap; session 28 timed each once, one after the other)
    step 560 python experiments/bench_moe_gemm.py --impls pallas_chain,einsum --rounds 3 --budget-s 420 \
        --out "$OUT/bench_moe_gemm_rounds_s39_h200.json"
    ;;
13) # session 41: the column bands again, each round in rotated order (session 41's call 15 ran the row-major
    # baseline first in every round, right after the einsum, and its rounds spread 10.5-13.6 ms where the banded
    # ones' spread under 1 ms), with flat_again (the same kernel as flat) as the A/A control: the rows kernel at
    # T = 4096 and 512, then the d_rhs kernel at T = 4096 against its own einsum bound (what share of the backward's
    # gap is d_rhs's)
    step 260 python experiments/bench_moe_gemm.py --rows-ab flat,band4,band12,flat_again --rows-ab-tokens 4096 \
        --ab-rounds 3 --out "$OUT/bench_moe_gemm_band_t4096_s42.json"
    step 110 python experiments/bench_moe_gemm.py --rows-ab flat,band4,flat_again --ab-rounds 3 \
        --out "$OUT/bench_moe_gemm_band_t512_s42.json"
    step 150 python experiments/bench_moe_gemm.py --deal-ab 4096 --deal-config longcat --deal-alphas equal \
        --deals round_robin --deal-bands 0,4 --ab-rounds 3 --out "$OUT/bench_moe_gemm_band_drhs_s42.json"
    ;;
14) # the main table's first cases (LongCat T = 512, 64, 512 skewed, 4096) in 2 rounds, row-major and then in the
    # bands call 13 favours (defaults: 4 and 4, session 41's best kernel by kernel), one process each on one
    # machine: what #8's targets read with bands
    step 270 python experiments/bench_moe_gemm.py --impls pallas_chain,einsum --rounds 2 --budget-s 200 \
        --out "$OUT/bench_moe_gemm_table_rowmajor_s42.json"
    step 270 python experiments/bench_moe_gemm.py --impls pallas_chain,einsum --rounds 2 --budget-s 200 \
        --rows-band "${2:-4}" --contract-band "${3:-4}" --out "$OUT/bench_moe_gemm_table_bands_s42.json"
    ;;
15) # #8's training MFU on an H100 with larger batches: 32 x 1024 does not fit its 80 GB, so 48 and 64 x 1024 run as
    # 3 and 4 microbatches of 16 (train.grad_accum_steps; the same update as one batch), which spreads AdamW's fixed
    # ~17 ms per step (11.7 ms on an H200, at memory bandwidth) over more tokens. lcflash.plan puts them at 70.4 GiB
    # against 70.1 for batch 20 alone (measured 66.3) and 77.6 for 2 x 20, over the 75.2 GiB that the 0.95 fraction
    # leaves. Batch 20 first, profiled: where an H100's step goes (by part and op, in its JSON; the trace stays on
    # the machine); single runs on one H100 spread by ~8% (session 41); 10 timed steps each
    G="python experiments/bench_train.py --gmm_impl pallas_chain --remat --warmup 2 --steps 10 --mem_fraction 0.95"
    step 220 $G --batch 20 --profile_dir /tmp/train_profile --out "$OUT/bench_train_b20_profile_h100.json"
    step 180 $G --batch 48 --set train.grad_accum_steps=3 --out "$OUT/bench_train_b48_ga3_h100.json"
    step 190 $G --batch 64 --set train.grad_accum_steps=4 --out "$OUT/bench_train_b64_ga4_h100.json"
    ;;
*)  echo "call number 1-15" >&2; exit 2 ;;
esac
