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
