"""experiments/decode_profile.py: kernels joined to the optimised HLO's op names and bytes."""

from experiment_scripts import load


def test_shape_bytes_counts_tuples_and_scalars():
    dp = load("decode_profile")
    assert dp.shape_bytes("(f32[32,1024]{1,0}, bf16[8,3]{1,0}, pred[])") == 32 * 1024 * 4 + 8 * 3 * 2 + 1
    assert dp.shape_bytes("token[]") == 0


SYNTHETIC = """
ENTRY %main {
  %p0 = bf16[32768,1024]{1,0} parameter(0)
  %p1 = f32[32768]{0} parameter(1)
  %gte.7 = (f32[12,64]{1,0}, s32[]) get-tuple-element(%tuple.3), index=0
  %input_add_reduce_fusion.61 = (f32[32,1024]{1,0}, bf16[32768,1024]{1,0}) fusion(%p0, %p1, %p0), kind=kInput, calls=%c, metadata={op_name="jit(step)/while/body/transpose(jvp())/reduce_sum"}
  ROOT %custom-call.2 = f32[12,64]{1,0} custom-call(%gte.7), custom_call_target="x", metadata={op_name="jit(step)/k"}
}
"""


def test_bytes_of_a_fusion_with_a_tuple_result_and_a_repeated_operand():
    dp = load("decode_profile")
    info = dp.hlo_ops(SYNTHETIC)
    shape, op, nbytes = info["input_add_reduce_fusion_61"]
    assert op == "transpose(jvp())/reduce_sum"
    assert nbytes == (32 * 1024 * 4 + 32768 * 1024 * 2) + (2 * 32768 * 1024 * 2 + 32768 * 4)
    assert info["custom-call_2"][2] == 2 * 12 * 64 * 4 + 4


def test_idle_counts_only_time_when_no_stream_runs_and_names_the_kernels_around_it():
    """Kernels overlap on concurrent streams: a gap after a short kernel while a long one still runs is not idle.
    Each gap is charged to the kernel that ended last before it and the one that starts it."""
    from lcflash.parallel.trace_overlap import Event

    dp = load("decode_profile")
    kernels = [Event("long", 0.0, 100.0, 1), Event("short", 10.0, 5.0, 2), Event("mid", 50.0, 10.0, 2),
               Event("next", 120.0, 10.0, 1), Event("tiny_gap", 132.0, 1.0, 1), Event("last", 150.0, 1.0, 2)]
    launches = [{"ph": "X", "name": "cuGraphLaunch x"}, {"ph": "X", "name": "cuLaunchKernel y"}]
    res = dp.launch_view({"traceEvents": launches}, kernels, steps=2, gap_us=3.0)
    # Idle: 100 -> 120 after "long" (20 us) and 133 -> 150 after "tiny_gap" (17 us); 130 -> 132 is under gap_us.
    assert res["device_idle_us_per_step"] == (20.0 + 17.0) / 2
    assert res["device_gaps_per_step"] == 1.0
    assert [(g["after"], g["before"], g["us_per_step"]) for g in res["idle_between"]] == [
        ("long", "next", 10.0), ("tiny_gap", "last", 8.5)]
    assert res["host_launches_per_step"] == {"cuGraphLaunch": 0.5, "cuLaunchKernel": 0.5}
    assert [(g["at_ms"], g["us"], g["after"], g["before"]) for g in res["long_gaps"]] == [
        (0.1, 20.0, "long", "next"), (0.133, 17.0, "tiny_gap", "last")]


def test_long_gaps_name_what_the_host_did_meanwhile():
    """Per host thread: the shortest event spanning the gap (where it waited) and the longest starting in it."""
    from lcflash.parallel.trace_overlap import Event

    dp = load("decode_profile")
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "python"}}]
    host = [{"ph": "X", "pid": 1, "tid": 7, "ts": 0.0, "dur": 500.0, "name": "step"},
            {"ph": "X", "pid": 1, "tid": 7, "ts": 90.0, "dur": 60.0, "name": "wait"},
            {"ph": "X", "pid": 1, "tid": 7, "ts": 110.0, "dur": 5.0, "name": "short"},
            {"ph": "X", "pid": 1, "tid": 7, "ts": 112.0, "dur": 30.0, "name": "launch"},
            {"ph": "X", "pid": 1, "tid": 7, "ts": 300.0, "dur": 5.0, "name": "after"},
            {"ph": "X", "pid": 2, "tid": 1, "ts": 105.0, "dur": 5.0, "name": "device_line"}]
    kernels = [Event("a", 0.0, 100.0, 1), Event("b", 140.0, 10.0, 1)]
    (gap,) = dp.launch_view({"traceEvents": meta + host}, kernels, steps=1)["long_gaps"]
    assert (gap["at_ms"], gap["us"]) == (0.1, 40.0)
    assert gap["host"] == {"python": {"spanning": "wait", "inside": [("launch", 12.0, 30.0), ("short", 10.0, 5.0)]}}


# A decode loop as XLA's GPU compiler leaves it: the step is the while body; part of it sits in a command buffer (a
# called computation returning a tuple). Kernels: a, b, c (chain a -> c), d in the call (d1 -> d2 on one output,
# d3 on the other), e after the call reading only the short output, then f joining everything.
LOOP = """
%fused_a (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  ROOT %n = f32[8]{0} negate(%x)
}

%command_buffer (cp0: f32[8], cp1: f32[8]) -> (f32[8], f32[8]) {
  %cp0 = f32[8]{0} parameter(0)
  %cp1 = f32[8]{0} parameter(1)
  %d1 = f32[8]{0} fusion(f32[8]{0} %cp0), kind=kLoop, calls=%fused_a
  %d2 = f32[8]{0} fusion(f32[8]{0} %d1), kind=kLoop, calls=%fused_a
  %d3 = f32[8]{0} fusion(f32[8]{0} %cp1), kind=kLoop, calls=%fused_a
  ROOT %t = (f32[8]{0}, f32[8]{0}) tuple(f32[8]{0} %d2, f32[8]{0} %d3)
}

%body (state: (s32[], f32[8], f32[8])) -> (s32[], f32[8], f32[8]) {
  %state = (s32[], f32[8]{0}, f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %h = f32[8]{0} get-tuple-element(%state), index=1
  %g = f32[8]{0} get-tuple-element(%state), index=2
  %a = f32[8]{0} fusion(f32[8]{0} %h), kind=kLoop, calls=%fused_a, metadata={op_name="jit(loop)/while/body/attn_0/dot_general"}
  %b = f32[8]{0} fusion(f32[8]{0} %g), kind=kLoop, calls=%fused_a
  %c = f32[8]{0} custom-call(f32[8]{0} %a), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(loop)/while/body/attn_0/mla_decode"}
  %call = (f32[8]{0}, f32[8]{0}) call(f32[8]{0} %c, f32[8]{0} %b), to_apply=%command_buffer
  %short = f32[8]{0} get-tuple-element(%call), index=1
  %long = f32[8]{0} get-tuple-element(%call), index=0
  %e = f32[8]{0} fusion(f32[8]{0} %short), kind=kLoop, calls=%fused_a, metadata={op_name="jit(loop)/while/body/mlp_0/mul"}
  %f = f32[8]{0} fusion(f32[8]{0} %e, f32[8]{0} %long), kind=kLoop, calls=%fused_a
  %i2 = s32[] add(s32[] %i, s32[] %i)
  ROOT %out = (s32[], f32[8]{0}, f32[8]{0}) tuple(s32[] %i2, f32[8]{0} %f, f32[8]{0} %e)
}

%cond (cs: (s32[], f32[8], f32[8])) -> pred[] {
  %cs = (s32[], f32[8]{0}, f32[8]{0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (h0: f32[8], g0: f32[8]) -> f32[8] {
  %h0 = f32[8]{0} parameter(0)
  %g0 = f32[8]{0} parameter(1)
  %z = s32[] constant(0)
  %init = (s32[], f32[8]{0}, f32[8]{0}) tuple(s32[] %z, f32[8]{0} %h0, f32[8]{0} %g0)
  %w = (s32[], f32[8]{0}, f32[8]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_critical_path_follows_tuple_elements_through_a_command_buffer():
    dp = load("decode_profile")
    res = dp.critical_path(LOOP)
    assert res["computation"] == "body"
    # a, b, c, d1-d3, e, f and the counter's add: 9 kernels; the longest chain a -> c -> d1 -> d2 -> f (e reads the
    # call's short output, which b -> d3 -> e reaches in 3). Collapsing the call's tuple would give 6 (via e).
    assert res["kernels"] == 9
    assert res["chain"] == ["a", "c", "d1", "d2", "f"] and res["path"] == 5.0
    weighted = dp.critical_path(LOOP, weight=lambda n: {"b": 10.0}.get(n, 1.0))
    assert weighted["chain"] == ["b", "d3", "e", "f"] and weighted["path"] == 13.0
    # An async pair is one kernel: its -start (a copy here, beside the chain), not the -done that waits for it.
    copy = LOOP.replace("  %e = ", "  %cs = (f32[8]{0}, f32[8]{0}) copy-start(f32[8]{0} %short)\n"
                        "  %cd = f32[8]{0} copy-done((f32[8]{0}, f32[8]{0}) %cs)\n  %e = ")
    assert dp.critical_path(copy)["kernels"] == 10 and dp.critical_path(copy)["path"] == 5.0
    summary = dp.path_summary(LOOP)
    assert summary["path_kernels"] == 5 and summary["step_kernels"] == 9
    # Timed by a trace: d2 runs as the fusion XLA deduplicated it into (d_shared), c is a custom call the trace
    # names otherwise (the median kernel, 2 us, stands in).
    dedup = LOOP.replace("%d2 = f32[8]{0} fusion(f32[8]{0} %d1), kind=kLoop, calls=%fused_a",
                         '%d2 = f32[8]{0} fusion(f32[8]{0} %d1), kind=kLoop, calls=%fused_a, '
                         'backend_config={"deduplicated_name":"d_shared"}')
    timed = dp.path_summary(dedup, {"a": 1.0, "b": 1.0, "d1": 2.0, "d_shared": 30.0, "d3": 1.0, "e": 3.0, "f": 2.0})
    assert timed["path_us"] == 1.0 + 2.0 + 2.0 + 30.0 + 2.0
    assert summary["path_by_scope"] == {"other": 3, "attn_0": 2}


def test_critical_path_parses_a_compiled_program():
    """XLA's own text: the chain is made of the program's kernels, and an independent branch is not on it (what
    XLA:CPU fuses differs from the GPU's, so the lengths are not fixed here; LOOP above fixes them)."""
    import jax
    import jax.numpy as jnp

    dp = load("decode_profile")

    def f(x):
        a = x
        for _ in range(4):
            a = a + jnp.max(a)
        return a, jnp.sin(x)

    x = jnp.ones((64, 64))
    text = jax.jit(f).lower(x).compile().as_text()
    res = dp.critical_path(text)
    comps, entry = dp.hlo_computations(text)
    assert res["computation"] == entry
    assert 1 <= len(res["chain"]) < res["kernels"]
    assert set(res["chain"]) <= {name for name, *_ in comps[entry]}


def test_decode_step_kernels_carry_their_sublayer():
    """The decode layer's named scopes reach the compiled step, so its critical path splits by sublayer."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lcflash.config import load_config, model_config
    from lcflash.infer.cache import DecodeCache
    from lcflash.infer.generation import Generator
    from lcflash.model import LongcatFlash

    dp = load("decode_profile")
    cfg = model_config(load_config("configs/tiny.py")).replace(dtype="float32", max_position_embeddings=64)
    g = Generator(LongcatFlash(cfg, nnx.Rngs(0)))
    sd = jax.ShapeDtypeStruct
    i32, f32, b32 = sd((), jnp.int32), sd((), jnp.float32), sd((1,), jnp.int32)
    cache = jax.eval_shape(lambda: DecodeCache.zeros(cfg, 1, 64, mtp=False))
    text = g.decode_loop.lower(g.dm.weights, cache, b32, b32, i32, i32, i32, jax.random.key(0), f32, f32,
                               out_len=8, greedy=True).compile().as_text()
    for scope in ("attn_0", "mlp_0", "moe", "attn_1", "mlp_1", "embed", "lm_head"):
        assert f"/{scope}/" in text, scope
    summary = dp.path_summary(text)
    assert 0 < summary["path_kernels"] < summary["step_kernels"]
    assert {"attn_0", "attn_1"} <= set(summary["path_by_scope"])
