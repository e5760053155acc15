#!/usr/bin/env bash
# GPU calls, one per device call (1, 2, 3 ran in session 35, 5 and 7 in 36; 6 waits on an attention kernel that
# gains alone; 4 (the persistent attention kernels in training) went with those kernels in session 60; 10 (the L2
# prefetch) and 11 ran in session 40; session 41 ran the in-kernel merge (gone since);
# session 42 ran the bands in rotated rounds (call 13 of 75ad468), 14, and the H100's training profile with
# gradient accumulation (call 15 of 75ad468: out of memory); session 43 ran 17 (the training A/B of
# model.dense_ffn_gmm, removed since; call 17 of 169a213) and the GPU tests session 42 had not reached; session 44
# ran 16 (rows bands of 2), 19 (training at batch 24) and 20 (d_rhs's masking and the empty groups' tiles; calls
# 16, 19 and 20 of d278522), and 18 before d_rhs's bands; session 45 ran d_rhs's ping-pong kernel (call 19 of
# 8aa3505; it lost, so its training A/B, 20, did not run; both removed since), 18 with d_rhs's bands, 8, and 9's
# first step (session 37's warpgroup split: it lost, so 9's training A/B did not run); session 46 ran 19 (d_rhs's
# tilings at T = 512) and 20 (decode-sized groups' wide column tiles: level, removed since) by wall time (call 20
# of 9ac361d), then by the device's busy time; session 47 ran 20 (d_rhs's bands of 2 and each product's kernels,
# on an H100), 21 (d_rhs's in-kernel profile and its staging buffer in two halves, removed since; call 21 of
# 454fd37) and 22 (on an H200; its step limit stopped it in the T = 4096 rounds); session 48 ran 23 (the next
# tile's entries loaded in a tile's last step only: level, removed since, so its training A/B, 24, did not run;
# calls 23 and 24 of 00b3b5e) and 22's cases in 2 rounds, twice, on an H100; session 49 ran 23 and d_rhs's ring
# depths and bands; session 50 ran 24 and 25 of 9a2c204 (their A/B commands alone) and 28 of a610601 (d_rhs's
# "alternate" deal: it lost, removed since); 27 (configs/small.py's training with the new d_rhs) is moot, since its
# 2,304 rows per group keep d_rhs at 4 stages in bands of 4; session 51 ran 27 and 28 (d_rhs on 2-CTA clusters,
# adopted below the deep threshold), 26 (the rows kernel at 3 stages: slower) and 24 with the clusters; session 52
# ran 29, 30 and 25 (clusters level at decode-sized groups and in training; the deep threshold stays 4,096) and 31
# of 0ad29fa (d_rhs as ping-pong: 1.4-2.1x slower, removed since), then the second ping-pong design of 71c50bb by
# an inline command (1.3-1.6x slower, removed since); session 53 ran 33 and 34 of 05938d9 (one-load step entries
# for d_rhs's TMA warpgroup: 2-7% faster; one index per step for both blocks: slower, removed since); session 54 ran
# 35 of 05938d9 (d_rhs in our own pipeline loop: level to 7% faster), 36, and 37 of 3bf6984 (the rows kernels in the
# same loop: 0-3% faster); both loops are the only flat pipelines since, so 33-35 and 37, whose switches went with
# the losing paths, and calls 8 and 9 (the warpgroups on row halves of a tile: lost in session 45, removed in
# session 53) are gone from this script; session 55 ran 38 of d1b0c34 (the rows kernels' half tiles: slower,
# removed since, so 38 is gone too), 39 and 40; session 56 ran 41-43 (both flat kernels' row windows on multiples
# of 8, now the default); session 57 ran 44 and 45, then b43fd25's call 46 (the training step's batches as host
# arrays, prefetched or on the device: level, removed since) by an inline command; session 58 ran 47 and 48 (the
# step's conditional: level; the step-start gap is the first traced step's launch) and 49 (batches 26 and 28: out of
# memory); session 59 ran 50 (Triton GEMM fusions against cuBLAS: level), 51 (programmatic dependent launch:
# level), 52 (the trainer's MFU metric beside the bench's) and 53 (150 trainer steps); session 60 ran 54 (the decode
# kernel at LongCat-Flash's shapes; the attention kernels' GPU tests), 55 (decode at LongCat-Flash's width), 56 (its
# batch-1 step traced) and 57 (the gather MoE as multiply + reduce: batch 1 at LongCat's width 1.55x faster);
# session 61 ran 58 (slots innermost: level; the model's MoE at batch 1 6-8% faster, on a hoisted transposed copy of
# the experts); 59 was lost with its machine; session 62 ran 60 and 61 (decode's "grouped" MoE); 62 did not run
# and is gone (63's first step is its tests); session 63 ran 63 (the grouped MoE against the gather over expert
# widths at batch 1); session 64 ran 64 and 65's two steps (as inline commands); session 66 ran 66 twice on one
# H100 (issue 8's first target at today's defaults); session 67 ran 67 (the dense FFNs' [2, F, D] decode layout:
# slower on one device, so only meshes that split F take it; HISTORY.md); session 68 ran 68; session 69 wrote 69
# (no GPU was lent):
#     bash experiments/gpu_calls.sh N [ARGS]     (N = 1-3, 5-36, 39-45, 47-61, 63-69; 14 takes the rows and d_rhs
#                                                bands, 18 a benchmark flag)
# run from the repository root on the device machine, with `.whl` carried (ml-collections and tensorboardX, which
# its image lacks) and `.whl-tokamax` where a call times the tokamax peer (tokamax 0.0.17 with its needs, 37 MB).
# Results go to $OUT (or ./out). Each step has its own time limit, so a hang or a failure costs that step, not the
# call.
#
# JAX's persistent compilation cache: a program compiled once loads instead of compiling again (a training run's
# cold compile took 99-182 s on an H100, a cached one 25 s; session 43). The cache comes back in $OUT/jcc; copied
# here to the ignored `.jcc` (`rm -rf .jcc && cp -r /work/.device/N/jcc .jcc`) and carried, it seeds the next
# machine's, which helps where that machine has the same card and image.
set -u
N=${1:?call number 1-3, 5-36, 39-45, 47-61 or 63-69}
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl $(ls .whl-tokamax/*.whl 2>/dev/null) || exit 1
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export XLA_FLAGS=--xla_gpu_per_fusion_autotune_cache_dir=/tmp/atc
export JAX_COMPILATION_CACHE_DIR=/tmp/jcc JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
mkdir -p /tmp/jcc
if [ -d .jcc ]; then cp -r .jcc/. /tmp/jcc/; fi
trap 'cp -r /tmp/jcc "$OUT/jcc"' EXIT
S=s36
T="python experiments/bench_train.py --gmm_impl pallas_chain --remat --warmup 2 --steps 3 --batch 32"  # call 6
T24="python experiments/bench_train.py --gmm_impl pallas_chain --remat --warmup 2 --steps 5 --mem_fraction 0.95"
T24="$T24 --batch 24"  # calls 45, 47, 48, 50-52
TARGETS=longcat/gate_up/512,longcat/down/512,longcat/gate_up/2048,longcat/down/2048,longcat/gate_up/4096,longcat/down/4096
TARGETS="$TARGETS,longcat/gate_up/512/skewed,longcat/down/512/skewed"  # issue 8's first target (calls 24, 36, 66)
step() {  # step LIMIT_S COMMAND...: run it, say how it ended
    local limit=$1; shift
    echo "=== $* (limit ${limit}s)"
    timeout "$limit" "$@"
    echo "=== rc=$?"
}
case $N in
1)  # tests: the attention kernels' fp32 checks, the peers
    step 150 python -m pytest -n 0 -q tests/test_train_attention.py -k fp32_as_closely
    step 120 python -m pytest -n 0 -q tests/test_gmm.py -k "peer or tokamax"
    ;;
2)  # attention alone: tokamax's flash attention on the same documents
    step 560 python experiments/bench_attention.py --isolate --batch 32 --variants dpa_mask,pallas,tokamax_docs \
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
11) # session 39: the main expert-GEMM table with ours and the einsum bound timed in 3 alternating rounds (the board
    # runs them at its power cap; session 28 timed each once, one after the other)
    step 560 python experiments/bench_moe_gemm.py --impls pallas_chain,einsum --rounds 3 --budget-s 420 \
        --out "$OUT/bench_moe_gemm_rounds_s39_h200.json"
    ;;
14) # the main table's first cases (LongCat T = 512, 64, 512 skewed, 4096) in 2 rounds, row-major and then in the
    # given bands (defaults: rows 4, d_rhs 0, the defaults since session 42), one process each on one machine
    step 270 python experiments/bench_moe_gemm.py --impls pallas_chain,einsum --rounds 2 --budget-s 200 \
        --rows-band 0 --contract-band 0 --out "$OUT/bench_moe_gemm_table_rowmajor.json"
    step 270 python experiments/bench_moe_gemm.py --impls pallas_chain,einsum --rounds 2 --budget-s 200 \
        --rows-band "${2:-4}" --contract-band "${3:-0}" --out "$OUT/bench_moe_gemm_table_bands.json"
    ;;
18) # the main table with the defaults (d_rhs in bands of 4 since session 44) in 2 rounds, past T = 2048 (#8's targets)
    # (a second argument, e.g. --contract-band 0, goes to the benchmark)
    step 330 python experiments/bench_moe_gemm.py --impls pallas_chain,einsum --rounds 2 --budget-s 300 ${2:-} \
        --out "$OUT/bench_moe_gemm_table_dbands.json"
    ;;
19) # session 45: d_rhs alone at LongCat's T = 512, where the [gate | up] backward (0.88) is the last balanced case
    # below 0.90 and d_rhs alone its whole gap (0.75 of the einsum), in tilings that need no code: the default (4
    # stages, 64-column stores, bands of 4), 3 stages with whole 128-column stores, each step's wgmma kept in flight
    # (overlap_mma), bands of 2 and of 8; bf16 output, 3 rotated rounds (all lower for CUDA on the CPU)
    step 330 python experiments/contract_ab.py --variants default,stages=3+epi_n=128,overlap_mma=1,band=2,band=8 \
        --rounds 3 --cases longcat/gate_up/512,longcat/down/512 --out "$OUT/contract_ab_t512_variants.json"
    ;;
20) # session 46: by the device's busy time per call (--device-time; wall time could not resolve configs/small.py's
    # T = 64 products), d_rhs's column bands of 4 (the default) against 2 (2 led d_rhs alone at LongCat's T = 512
    # on an H200, 0.77-0.82 against 0.72-0.75, while the whole backward's wall-time rounds overlapped), and each
    # product's kernels per call (configs/small.py's T = 64 forward ran at 0.81 of the einsum's device time on an
    # H200: which kernels hold the other 7.5 us), and the T <= 64 floor target by device time on this card
    step 480 python experiments/contract_ab.py --gmm-switch CONTRACT_BAND=4,2 --rounds 2 --device-time --cases \
        small/gate_up_fused/64,small/down/64,longcat/gate_up/8,longcat/gate_up/512,longcat/down/512 \
        --out "$OUT/contract_ab_band_device.json"
    ;;
21) # session 46: where d_rhs's time goes at LongCat's T = 512 (0.75-0.80 of the einsum alone): the in-kernel
    # profiler's "mma", "next_tile", "epilogue" and its "store_wait" per compute warpgroup, 4 groups, 3 stages;
    # both projections (session 47 also timed the staging buffer in two halves here: call 21 of 454fd37)
    for proj in gate_up down; do
        step 150 python experiments/gmm_profile.py --impls d_rhs --proj $proj --groups 4 --t 512 \
            --out "$OUT/gmm_profile_d_rhs_$proj.json"
    done
    ;;
22) # session 47: issue 8's first target on an H100 by the device's busy time (the wall clock's rounds spread
    # 0.85-0.91 for LongCat's [gate | up] backward at T = 512 in session 47's call 20, its device time 0.92-0.99):
    # the whole product at T = 512, 2048 and 4096, both projections, 4 rounds of the default against the einsum
    step 560 python experiments/contract_ab.py --gmm-switch CONTRACT_BAND=4 --rounds 4 --device-time --cases \
        longcat/gate_up/512,longcat/down/512,longcat/gate_up/2048,longcat/down/2048,longcat/gate_up/4096,longcat/down/4096 \
        --out "$OUT/contract_ab_t512up_device.json"
    ;;
23) # session 48: d_rhs where it is weakest on an H100 by device time, LongCat's T = 4096 (the down backward 0.81-0.88
    # of the einsum, its contract kernel 11.2-12.7 ms against cuBLAS's 9.3-9.5; contract_ab_t512up_device_s48*):
    # d_rhs alone in its tilings there (cuBLAS picked 256 x 128 CTA tiles; tile_m=256+tile_n=64 is that shape and
    # fits with 3 stages; a 128-row k step with 2; bands), then its in-kernel profile at T = 4096 (one group: 3 tiles
    # of 64 steps per CTA, within --space) and at T = 512 (this card's baseline for the scopes' shares)
    step 300 python experiments/contract_ab.py --rounds 2 --cases longcat/down/4096,longcat/gate_up/4096 --variants \
        default,stages=3,tile_m=256+tile_n=64+stages=3,tile_k=128+stages=2,band=2,band=8 \
        --out "$OUT/contract_ab_t4096_variants.json"
    step 120 python experiments/gmm_profile.py --impls d_rhs --proj down --groups 1 --t 4096 \
        --out "$OUT/gmm_profile_d_rhs_down_t4096.json"
    step 100 python experiments/gmm_profile.py --impls d_rhs --proj down --groups 4 --t 512 \
        --out "$OUT/gmm_profile_d_rhs_down_t512.json"
    ;;
24) # session 50: issue 8's first target with the session-50 defaults (d_rhs at 3 stages in bands of 2 over groups of
    # 4,096 rows or more on average, else 4 in bands of 4) by device time, 3 rounds (a one-value switch: the
    # defaults alone), at LongCat's T = 512, 2048, 4096 and the skewed T = 512
    step 560 python experiments/contract_ab.py --gmm-switch CONTRACT_DEEP_ROWS=4096 --rounds 3 --device-time \
        --cases "$TARGETS" \
        --out "$OUT/contract_ab_targets_device.json"
    ;;
25) # session 50: where d_rhs's deep ring starts to pay: 3 stages in bands of 2 from 3,072 rows per group against
    # from 4,096, at LongCat's T = 3072 (at 2048 the two were level, at 4096 the deep ring 5-18% faster)
    step 300 python experiments/contract_ab.py --gmm-switch CONTRACT_DEEP_ROWS=4096,3072 --rounds 2 --device-time \
        --cases longcat/down/3072,longcat/gate_up/3072 --out "$OUT/contract_ab_deep_rows_device.json"
    ;;
26) # session 49: the rows kernel's ring at 3 stages (pallas_gmm.ROWS_STAGES; 4 fill shared memory at LongCat's
    # shapes, as they did for d_rhs, which gained 15-20% at T = 4096 with 3): the whole product by device time, whose
    # forward is the rows kernel alone and whose kernels_us hold d_lhs's
    step 420 python experiments/contract_ab.py --gmm-switch ROWS_STAGES=4,3 --rounds 2 --device-time --cases \
        longcat/down/4096,longcat/gate_up/4096,longcat/down/512,longcat/gate_up/512 \
        --out "$OUT/contract_ab_rows_stages_device.json"
    ;;
27) # session 51: d_rhs on 2-CTA clusters sharing dout's blocks (mgpu_kernels.Tiles.cluster_k; cuBLAS runs these
    # products in 2-CTA clusters, and d_rhs waits on its ring ~15-20% of the time at T = 512): the GPU tests
    # (bitwise the per-tile kernel), then d_rhs alone against the default in rotated rounds, bitwise checked
    step 240 python -m pytest -n 0 -q tests/test_gmm.py -k gpu_flat_contract
    step 330 python experiments/contract_ab.py --rounds 3 --variants default,cluster_k=1 --cases \
        longcat/gate_up/512,longcat/down/512,longcat/gate_up/4096,longcat/down/4096,longcat/down/512/skewed,\
small/gate_up_fused/2304 --out "$OUT/contract_ab_cluster_kernel.json"
    ;;
28) # session 51: the whole product with d_rhs on 2-CTA clusters (pallas_gmm.CONTRACT_CLUSTER) by device time
    step 560 python experiments/contract_ab.py --gmm-switch CONTRACT_CLUSTER=False,True --rounds 2 --device-time \
        --cases longcat/gate_up/512,longcat/down/512,longcat/gate_up/2048,longcat/down/2048,longcat/gate_up/512/skewed \
        --out "$OUT/contract_ab_cluster_device.json"
    ;;
29) # session 51: the clustered d_rhs at decode-sized groups (on by default below 4,096 rows a group, measured only
    # from 512 up): the T <= 64 target's cases by device time, clusters off against on
    step 300 python experiments/contract_ab.py --gmm-switch CONTRACT_CLUSTER=False,True --rounds 2 --device-time \
        --cases small/gate_up_fused/64,small/down/64,longcat/gate_up/64,longcat/down/64,longcat/gate_up/8 \
        --out "$OUT/contract_ab_cluster_decode_device.json"
    ;;
30) # session 51: configs/small.py's training at batch 24 with the clustered [gate | up] d_rhs (now the default;
    # the 29.9% MFU of session 45 predates it), then without, on one machine
    B="python experiments/bench_train.py --gmm_impl pallas_chain --remat --warmup 2 --steps 10 --mem_fraction 0.95"
    B="$B --batch 24"
    step 290 $B --out "$OUT/bench_train_b24_cluster.json"
    step 290 $B --gmm_switch CONTRACT_CLUSTER=False --out "$OUT/bench_train_b24_nocluster.json"
    ;;
36) # session 54: our own loop as the only flat d_rhs pipeline (call 35: level to 7% faster; the step table gone) and
    # the warpgroups' row offset (always 0 since the row split went) gone from both kernels: the GPU tests (the flat
    # d_rhs bitwise the per-tile kernel, with clusters and with late release; both products' gradients), then issue
    # 8's first target by device time in 2 rounds (a one-value switch: the defaults alone)
    step 170 python -m pytest -n 0 -q tests/test_gmm.py -k "gpu_flat_contract or gpu_pallas"
    step 400 python experiments/contract_ab.py --gmm-switch CONTRACT_ZERO_EMPTY=True --rounds 2 --device-time \
        --cases "$TARGETS" \
        --out "$OUT/contract_ab_targets_device.json"
    ;;
39) # the expert kernels' GPU tests at once (call 38's output lost the first of them behind its A/B's JSON lines):
    # the flat rows kernels bitwise the per-tile ones, the forward and gradients of both impls, the fused FFN
    step 200 python -m pytest -n 0 -q -p no:cacheprovider tests/test_gmm.py -k gpu_flat_rows
    step 360 python -m pytest -n 0 -q -p no:cacheprovider tests/test_gmm.py -k "gpu_pallas or gpu_ffn"
    ;;
40) # issue 5's bound: a dependent phase inside one kernel behind a grid barrier (session 36: ~1.3 us beyond its
    # bytes) against behind only the neighbour's flag, the least a fused decode kernel's dependent step can cost
    step 200 python experiments/bench_decode_ops.py --sections=phases --phase_rows=1,16,64 --json="$OUT/bench_decode_ops_phases_s55_h100.json"
    ;;
41) # session 55: the flat rows kernels' row windows on multiples of 8 (pallas_gmm.ROWS_ALIGN, 0 = blocks: at the
    # skewed T = 512, 287 row tiles against 304, rows used 0.892 against 0.842; balanced loads are the same tiles).
    # The default kernels changed too (a tile's row travels in units of 8): the GPU tests first (the rows kernels
    # bitwise with and without, the flat rows bitwise the per-tile ones, both impls' forward and gradients), then
    # both products by device time, the balanced case as the control
    step 200 python -m pytest -n 0 -q -p no:cacheprovider tests/test_gmm.py -k "gpu_rows_align or gpu_flat_rows"
    step 300 python -m pytest -n 0 -q -p no:cacheprovider tests/test_gmm.py -k "gpu_pallas or gpu_ffn"
    step 330 python experiments/contract_ab.py --gmm-switch ROWS_ALIGN=0,8 --rounds 2 --device-time \
        --cases longcat/gate_up/512/skewed,longcat/down/512/skewed,longcat/gate_up/512 \
        --out "$OUT/contract_ab_rows_align_device.json" | grep -v "^gmm_switch_ab"
    ;;
42) # session 56: d_rhs's 64-row windows on multiples of 8 (pallas_gmm.CONTRACT_ALIGN, 0 = lhs's blocks: at the
    # skewed T = 512, 540 steps per tile column against 559), with ROWS_ALIGN = 8 now the default. The flat d_rhs's
    # default lowering changed too (a window's row carried as row / 8, moved back at row m): the GPU tests first (the
    # flat d_rhs bitwise the per-tile one; the windows against float64), then d_rhs by device time, balanced control
    step 240 python -m pytest -n 0 -q -p no:cacheprovider tests/test_gmm.py -k "gpu_contract_align or gpu_flat_contract"
    step 300 python experiments/contract_ab.py --gmm-switch CONTRACT_ALIGN=0,8 --rounds 2 --device-time \
        --cases longcat/gate_up/512/skewed,longcat/down/512/skewed,longcat/gate_up/512 \
        --out "$OUT/contract_ab_contract_align_device.json" | grep -v "^gmm_switch_ab"
    ;;
43) # session 56: call 42's d_rhs A/B again in 3 rounds (its skewed [gate | up] scattered by 6% within one setting),
    # with configs/small.py's training-like loads (Dirichlet(1) shares: 1,096 d_rhs steps per tile column against
    # 1,148; the rows kernels' 581 tiles against 637)
    step 420 python experiments/contract_ab.py --gmm-switch CONTRACT_ALIGN=0,8 --rounds 3 --device-time \
        --cases longcat/gate_up/512/skewed,longcat/down/512/skewed,small/gate_up_fused/512/1.0,small/down/512/1.0 \
        --out "$OUT/contract_ab_contract_align3_device.json" | grep -v "^gmm_switch_ab"
    ;;
44) # session 56: the expert kernels' forward and gradients at the new defaults (both flat kernels' windows on
    # multiples of 8), both impls, and the fused FFN; session 57: with row_schedule's rows in units of 8 (the rows
    # kernels' lowering changed again), the flat rows kernels bitwise the per-tile ones and with/without windows
    step 450 python -m pytest -n 0 -q -p no:cacheprovider tests/test_gmm.py \
        -k "gpu_pallas or gpu_ffn or gpu_flat_rows or gpu_rows_align"
    ;;
45) # session 56: configs/small.py's training at batch 24 with both flat kernels' windows on multiples of 8 (the
    # default; training-like loads: the rows kernels' 581 tiles against 637, d_rhs's 1,096 steps against 1,148), then
    # on lhs's blocks, on one machine (session 54: 30.0% MFU)
    B=$T24
    step 290 $B --out "$OUT/bench_train_b24_align8.json"
    step 290 $B --gmm_switch ROWS_ALIGN=0 --gmm_switch CONTRACT_ALIGN=0 --out "$OUT/bench_train_b24_align0.json"
    ;;
47) # session 58: the train step's one conditional (the router's LB/LM gradient ratio, lax.cond every step) makes
    # XLA's host wait for the device at it; traced at the default and without the conditional
    # (train.grad_ratio_every=0), each gap of the step named with what the host ran meanwhile
    B=$T24
    step 290 $B --profile_dir "$OUT/prof_cond" --out "$OUT/bench_train_b24_cond_prof.json"
    step 290 $B --set train.grad_ratio_every=0 --profile_dir "$OUT/prof_nocond" \
        --out "$OUT/bench_train_b24_nocond_prof.json"
    rm -rf "$OUT"/prof_*
    ;;
48) # session 58: call 47's A/B with a third arm, the conditional as a CUDA-graph node (XLA's CONDITIONAL command
    # buffers: no host wait), then a second round in reversed order (programs cached by call 47 on a warm machine)
    B=$T24
    CB="$XLA_FLAGS --xla_gpu_enable_command_buffer=+CONDITIONAL"
    step 200 env XLA_FLAGS="$CB" $B --out "$OUT/bench_train_b24_cbcond.json"
    step 200 env XLA_FLAGS="$CB" $B --out "$OUT/bench_train_b24_cbcond_r2.json"
    step 200 $B --set train.grad_ratio_every=0 --out "$OUT/bench_train_b24_nocond_r2.json"
    step 200 $B --out "$OUT/bench_train_b24_cond_r2.json"
    ;;
49) # session 58: configs/small.py's training at batches 26 and 28 against 24 (AdamW's ~21 ms per step is fixed, so a
    # larger batch spreads it; batch 24 peaked at 68.6 of 75.2 GiB at a memory fraction of 0.95)
    B="python experiments/bench_train.py --gmm_impl pallas_chain --remat --warmup 2 --steps 5 --mem_fraction 0.97"
    step 190 $B --batch 28 --out "$OUT/bench_train_b28_s58_h100.json"
    step 190 $B --batch 26 --out "$OUT/bench_train_b26_s58_h100.json"
    step 190 $B --batch 24 --out "$OUT/bench_train_b24_m97_s58_h100.json"
    ;;
50) # session 58: the step's matmuls XLA fuses into Triton GEMMs (4.8 ms per step at 24 x 1024; the attention's
    # narrow kv_b products at 270-310 TFLOP/s among them) left to cuBLAS instead, against the default
    B=$T24
    step 200 $B --xla_option xla_gpu_enable_triton_gemm=false --out "$OUT/bench_train_b24_notriton.json"
    step 200 $B --out "$OUT/bench_train_b24_triton.json"
    ;;
51) # session 59: programmatic dependent launch (each kernel launched while the one before drains) in training, in
    # rotated rounds on one machine (each arm compiles once; the cache serves its second run)
    B=$T24
    step 200 $B --xla_option xla_gpu_enable_pdl=true --out "$OUT/bench_train_b24_pdl.json"
    step 200 $B --out "$OUT/bench_train_b24_nopdl.json"
    step 120 $B --out "$OUT/bench_train_b24_nopdl_r2.json"
    step 120 $B --xla_option xla_gpu_enable_pdl=true --out "$OUT/bench_train_b24_pdl_r2.json"
    ;;
52) # session 59: the trainer's own MFU metric (lcflash.params.train_flops_per_token at each logged step's FFN experts
    # per token) on configs/small.py at batch 24, against bench_train's figure for the same step on the same machine
    step 200 $T24 --out "$OUT/bench_train_b24_vs_trainer.json"
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
    step 400 python -m lcflash.train --config=configs/small.py --workdir=/tmp/w52 --config.train.batch_size=24 \
        --config.model.remat=True --config.train.steps=1000 --config.train.stop_at=60 --config.train.log_every=10 \
        --config.train.progress=False
    cp /tmp/w52/metrics.jsonl "$OUT/train_small_b24_metrics.jsonl"
    ;;
53) # session 59: the trainer's metrics test on a GPU (MFU present where the peak is known), then 150 steps of
    # configs/small.py at batch 24 with the MFU counted at each 25-step interval's mean FFN experts per token
    step 150 python -m pytest -n 0 -q -p no:cacheprovider tests/test_train.py -k metrics_are_logged
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
    step 400 python -m lcflash.train --config=configs/small.py --workdir=/tmp/w53 --config.train.batch_size=24 \
        --config.model.remat=True --config.train.steps=1000 --config.train.stop_at=150 --config.train.log_every=25 \
        --config.train.progress=False
    cp /tmp/w53/metrics.jsonl "$OUT/train_small_b24_150_metrics.jsonl"
    ;;
54) # session 60: the decode kernel at LongCat-Flash's shapes (64 heads, a latent of 512: two latent chunks per
    # CTA's split, MTP's two row tiles) against the references, and the attention kernels without their persistent
    # forms (gone), on the GPU
    step 420 python -m pytest -n 0 -q -p no:cacheprovider tests/test_mla_decode.py tests/test_doc_attention.py \
        tests/test_train_attention.py -k "not tokamax"
    ;;
55) # session 60: batch-1 and batch-8 decode at LongCat-Flash's width (its attention, dense FFNs, experts and vocab;
    # 2 layers of 32 FFN + 16 zero experts, so it fits one GPU), XLA's attention against the kernel, with the floor
    L="--set model.num_layers=2 --set model.n_routed_experts=32 --set model.zero_expert_num=16"
    step 560 python experiments/bench_decode.py --part=jax --config=configs/longcat_flash.py $L --batches=1,8 \
        --contexts=1024 --impls=absorbed,pallas --rounds=2 --no-speculative --no-dense_moe_rows \
        --json="$OUT/bench_decode_longcat_width_s60.json"
    ;;
56) # session 60: where call 55's batch-1 step at LongCat-Flash's width goes (59% of its floor, where batch 8 ran at
    # 99%): its trace and HLO, kernels by time
    L="--set model.num_layers=2 --set model.n_routed_experts=32 --set model.zero_expert_num=16"
    step 300 python experiments/bench_decode.py --part=jax --config=configs/longcat_flash.py $L --batches=1 \
        --contexts=1024 --impls=absorbed --rounds=1 --no-speculative --no-dense_moe_rows --profile --dump_hlo \
        --out_dir="$OUT" --json="$OUT/bench_decode_longcat_width_prof_s60.json"
    step 120 python experiments/decode_profile.py --hlo="$OUT/hlo_absorbed_b1.txt" \
        --trace="$OUT/trace_decode_b1_absorbed.json.gz" --steps=33 --json="$OUT/decode_profile_longcat_width_s60.json"
    ;;
57) # session 60: the gather MoE's matvecs as multiply + reduce (decode.GATHER_AS_REDUCE, new) against the einsums
    # ("+gather_dot"), at LongCat-Flash's width (call 56: the einsums wrote the gathered experts out, 2.5 of 4.5 ms)
    # and on configs/small.py, batch 1, two rounds each
    L="--set model.num_layers=2 --set model.n_routed_experts=32 --set model.zero_expert_num=16"
    step 150 python experiments/bench_decode.py --part=jax --config=configs/longcat_flash.py $L --batches=1,8 \
        --contexts=1024 --impls=absorbed,absorbed+gather_dot,pallas --rounds=2 --no-speculative --no-dense_moe_rows \
        --json="$OUT/bench_decode_longcat_width_reduce_s60.json"
    step 240 python experiments/bench_decode.py --part=jax --batches=1 --contexts=1024 \
        --impls=pallas,pallas+gather_dot --rounds=2 --no-speculative --no-dense_moe_rows \
        --json="$OUT/bench_decode_small_reduce_s60.json"
    ;;
58) # session 60: the decode paths' GPU tests with the gather MoE as multiply + reduce, then the gather's slots as the
    # innermost output axis ("+slots_inner": a zero-expert slot's re-read of an expert right after it, maybe from L2;
    # call 57's remaining 10% at batch 1 is about the zero slots' 4 x 75 MB per layer) against the default, batch 1
    step 150 python -m pytest -n 0 -q -p no:cacheprovider tests/test_decode_layout.py tests/test_mla_decode.py \
        -k "model_decode or gather or decode_only or cached"
    L="--set model.num_layers=2 --set model.n_routed_experts=32 --set model.zero_expert_num=16"
    step 150 python experiments/bench_decode.py --part=jax --config=configs/longcat_flash.py $L --batches=1 \
        --contexts=1024 --impls=absorbed,absorbed+slots_inner --rounds=2 --no-speculative --no-dense_moe_rows \
        --json="$OUT/bench_decode_longcat_width_slots_s60.json"
    # session 61: the model's MoE at batch 1 (tokens sorted into 12 rows, our grouped-matmul kernels, which read no
    # weights for an empty group: the zero-expert slots read nothing) against the gather MoE at the same width
    step 200 python experiments/bench_decode.py --part=jax --config=configs/longcat_flash.py $L --batches=1 \
        --set moe.gmm_impl=auto --contexts=1024 --impls=absorbed --moe_impl=model --rounds=2 --no-speculative \
        --no-dense_moe_rows --json="$OUT/bench_decode_longcat_width_model_moe_s61.json"
    ;;
59) # session 61: the model's MoE against the decode path's auto (gather / dense) at batch 8 on LongCat-Flash's width
    # and at batch 1 and 8 on configs/small.py, for the width from which decode should run the model's MoE (it needs
    # the experts in the model's layout first: today XLA hoists a transposed copy of them out of the decode loop)
    L="--set model.num_layers=2 --set model.n_routed_experts=32 --set model.zero_expert_num=16"
    for M in auto model; do
        step 200 python experiments/bench_decode.py --part=jax --config=configs/longcat_flash.py $L --batches=8 \
            --set moe.gmm_impl=auto --contexts=1024 --impls=absorbed --moe_impl=$M --rounds=2 --no-speculative \
            --no-dense_moe_rows --json="$OUT/bench_decode_longcat_width_b8_${M}_moe_s61.json"
    done
    step 240 python experiments/bench_decode.py --part=jax --batches=1,8 --contexts=1024 --impls=pallas \
        --moe_impl=model --rounds=2 --no-speculative --no-dense_moe_rows \
        --json="$OUT/bench_decode_small_model_moe_s61.json"
    ;;
60) # session 62: decode's "grouped" MoE (slots sorted by expert; our grouped-matmul kernels read the decode layout's
    # contraction-last experts as stored, so no transposed copy): its GPU tests, then against the gather and the dense
    # MoE on configs/small.py (batch 1, 8, 64) and at LongCat-Flash's width (2 layers of 32 + 16 experts, batch 1, 8)
    step 150 python -m pytest -n 0 -q -p no:cacheprovider tests/test_gmm.py tests/test_decode_layout.py \
        -k "nt_ or grouped or gather_and_dense"
    step 200 python experiments/bench_decode.py --part=jax --batches=1,8,64 --contexts=1024 --impls=pallas \
        --moe_impl=gather,grouped,dense --rounds=2 --no-speculative --no-dense_moe_rows \
        --json="$OUT/bench_decode_small_grouped_s62.json"
    L="--set model.num_layers=2 --set model.n_routed_experts=32 --set model.zero_expert_num=16"
    step 220 python experiments/bench_decode.py --part=jax --config=configs/longcat_flash.py $L --batches=1,8 \
        --set moe.gmm_impl=auto --contexts=1024 --impls=absorbed --moe_impl=gather,grouped,dense --rounds=2 \
        --no-speculative --no-dense_moe_rows --json="$OUT/bench_decode_longcat_width_grouped_s62.json"
    ;;
61) # session 62: the row gather's rows per CTA bounded by shared memory (call 60's grouped MoE at LongCat-Flash's
    # width and batch 8 failed to lower: 32 rows of 6144 staged), its GPU tests; then batch 8 at that width again, and
    # a realistic expert count: 1 layer of 256 FFN + 128 zero experts (19 GB of experts, twice with the decode copy),
    # batch 1, 8, 64, where the dense MoE reads every expert and the gather one expert per slot
    step 100 python -m pytest -n 0 -q -p no:cacheprovider tests/test_row_gather.py
    L="--set model.num_layers=2 --set model.n_routed_experts=32 --set model.zero_expert_num=16"
    step 150 python experiments/bench_decode.py --part=jax --config=configs/longcat_flash.py $L --batches=8 \
        --set moe.gmm_impl=auto --contexts=1024 --impls=absorbed --moe_impl=gather,grouped,dense --rounds=2 \
        --no-speculative --no-dense_moe_rows --json="$OUT/bench_decode_longcat_width_b8_grouped_s62.json"
    L="--set model.num_layers=1 --set model.n_routed_experts=256 --set model.zero_expert_num=128"
    step 300 python experiments/bench_decode.py --part=jax --config=configs/longcat_flash.py $L --batches=1,8,64 \
        --set moe.gmm_impl=auto --contexts=1024 --impls=absorbed --moe_impl=gather,grouped,dense --rounds=2 \
        --no-speculative --no-dense_moe_rows --json="$OUT/bench_decode_longcat_width_e256_grouped_s62.json"
    ;;
63) # session 63 (ran; its sweep first without scan_unroll=4, invalid at 4 layers, then again inline): the tests of
    # call 62 (which never ran), then where decode's grouped MoE starts to beat the gather at batch 1: configs/small.py
    # (D = 1024) on 4 layers of 32 FFN + 16 zero experts, each expert 2.4, 9.4, 18.9 and 37.7 MB (the auto rule's
    # GROUPED_MIN_EXPERT_BYTES, 16 MiB, sits between the two widths measured before: 2.4 and 75.5 MB)
    step 150 python -m pytest -n 0 -q -p no:cacheprovider -W ignore tests/test_row_gather.py tests/test_decode_layout.py \
        tests/test_mla_decode.py -k "row_gather or take_rows or layout or moe or decode_only or model_decode" 2>&1 | tail -15
    for I in 384 1536 3072 6144; do
        step 90 python experiments/bench_decode.py --part=jax --batches=1 --contexts=1024 --impls=pallas \
            --set model.num_layers=4 --set model.scan_unroll=4 --set model.n_routed_experts=32 \
            --set model.zero_expert_num=16 --set model.expert_ffn_hidden_size=$I --moe_impl=gather,grouped \
            --rounds=2 --no-speculative --no-dense_moe_rows --json="$OUT/bench_decode_small_width_i${I}_s63.json" 2>&1 | tail -8
    done
    ;;
64) # session 63: the row gather's Hopper tests with XLA's path as their reference on a GPU too (call 63 found the
    # combine test computing its reference on the kernel there, then reading the rows the kernel leaves unwritten)
    step 200 python -m pytest -n 0 -q -p no:cacheprovider -W ignore tests/test_row_gather.py 2>&1 | tail -6
    ;;
65) # session 64: tests/conftest.py's interpreter patches under JAX 0.11.2 (the interpreted kernels on this host's
    # CPU), then the decode paths' GPU tests (session 64 ran both as inline commands)
    JAX_PLATFORMS=cpu step 300 python -m pytest -q -n 12 --dist load -p no:cacheprovider -W ignore \
        tests/test_gmm.py tests/test_moe.py tests/test_doc_attention.py tests/test_row_gather.py tests/test_mla_decode.py \
        -k "interpret or tail_unwritten or interpreter" 2>&1 | tail -4
    step 400 python -m pytest -n 0 -q -p no:cacheprovider -W ignore tests/test_mla_decode.py tests/test_decode_layout.py \
        tests/test_row_gather.py 2>&1 | tail -4
    ;;
66) # session 66: issue 8's first target at today's defaults (session 54's call 36 timed the T = 4096 and skewed
    # cases before the rows kernels' own loop and session 56's row windows on multiples of 8): the whole product
    # by device time in 2 rounds (a one-value switch: the defaults alone), the 8 cases of call 36 ($TARGETS)
    step 560 python experiments/contract_ab.py --gmm-switch ROWS_ALIGN=8 --rounds 2 --device-time \
        --cases "$TARGETS" \
        --out "$OUT/contract_ab_targets_device.json" | grep -v "^gmm_switch_ab"
    ;;
67) # session 67: this tree's decode against the tree in .ab_base (carried; `git archive 2ec5bcc lcflash configs
    # experiments/bench_decode.py experiments/bench_moe_gemm.py | tar -x -C .ab_base`), configs/small.py at batch 1
    # and 8, base and new in turn twice; then the decode tests on the GPU. It ran with the dense FFNs' [2, F, D]
    # decode layout on every device count (slower on one; now taken only where a mesh splits F)
    B="--part=jax --batches=1,8 --contexts=1024 --impls=pallas --moe_impl=gather --rounds=2 --no-speculative"
    for r in 1 2; do
        step 150 python .ab_base/experiments/bench_decode.py $B --json="$OUT/bench_decode_layout_base_r$r.json" \
            --out_dir="$OUT" 2>&1 | tail -8
        step 150 python experiments/bench_decode.py $B --json="$OUT/bench_decode_layout_new_r$r.json" \
            --out_dir="$OUT" 2>&1 | tail -8
    done
    step 150 python -m pytest -n 0 -q -p no:cacheprovider tests/test_decode_layout.py tests/test_mla_decode.py
    ;;
68) # session 68: the decode tests on the GPU after data-parallel attention (lcflash/infer/split.py), whose one-device
    # decode and speculative loops lower to the StableHLO of the tree before (checked on the CPU for the cuda
    # platform): the Pallas kernel's path through `MeshSplit.attention` and the decode layout
    step 400 python -m pytest -n 0 -q -p no:cacheprovider tests/test_mla_decode.py tests/test_decode_layout.py 2>&1 | tail -5
    ;;
69) # session 69 (prepared; no GPU was lent): does a second stream hide memory-bound work under matmuls
    # (experiments/stream_overlap.py: cuBLAS, then our grouped kernels, beside an AdamW-shaped update); then the
    # router's and the decode paths' GPU tests after CPUs moved to lax.top_k (lcflash/model/router.py)
    step 240 python experiments/stream_overlap.py --out "$OUT/stream_overlap.json"
    step 300 python -m pytest -n 0 -q -p no:cacheprovider tests/test_moe.py tests/test_mla_decode.py 2>&1 | tail -5
    ;;
*)  echo "call number 1-3, 5-36, 39-45, 47-61 or 63-69" >&2; exit 2 ;;
esac
