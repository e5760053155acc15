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
