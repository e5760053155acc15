"""The trace summary measures collective time hidden behind compute on other streams (synthetic traces)."""

import gzip
import json

import numpy as np
import pytest

from lcflash.parallel.trace_overlap import classify, device_kernels, overlap_summary, summarize_trace

NCCL = "ncclDevKernel_SendRecv(ncclDevComm *, unsigned long, ncclWork *)"


@pytest.mark.parametrize("name,kind", [
    (NCCL, "collective"), ("ncclKernel_AllToAll_RING_LL", "collective"), ("all-to-all-start.3", "collective"),
    ("AllGather", "collective"), ("ragged_all_to_all_kernel", "collective"), ("MemcpyP2P", "collective"),
    ("MemcpyD2D", "memory"), ("Memset", "memory"), ("loop_add_fusion", "compute"),
    ("ragged_dot_fusion", "compute"), ("_gmm_kernel", "compute"), ("sm90_xmma_gemm_bf16", "compute"),
])
def test_classify(name, kind):
    assert classify(name) == kind


def test_collective_partly_under_compute_on_another_stream():
    ev = [("gemm", 0, 10, "A"), ("gemm", 20, 10, "A"), (NCCL, 5, 20, "B")]
    s = overlap_summary(ev)
    assert s["collective_us"] == 20 and s["compute_us"] == 20
    assert s["collective_overlapped_us"] == 10 and s["exposed_collective_us"] == 10
    assert s["overlap_fraction"] == 0.5
    assert s["collective_kernels"] == [dict(name=NCCL, count=1, us=20, overlapped_us=10)]
    assert s["streams"] == {"A": {"compute": 20}, "B": {"collective": 20}}


def test_compute_on_the_same_stream_hides_nothing():
    s = overlap_summary([("gemm", 0, 30, "A"), (NCCL, 5, 10, "A")])
    assert s["collective_overlapped_us"] == 0 and s["overlap_fraction"] == 0


def test_concurrent_compute_streams_are_not_counted_twice():
    ev = [("gemm", 0, 10, "A"), ("softmax", 5, 10, "C"), (NCCL, 0, 20, "B")]
    assert overlap_summary(ev)["collective_overlapped_us"] == 15


def test_copies_are_not_compute_and_steps_divide_times():
    ev = [("MemcpyD2D", 0, 20, "A"), ("gemm", 30, 8, "A"), (NCCL, 0, 40, "B")]
    s = overlap_summary(ev, steps=2)
    assert s["memory_us"] == 10 and s["compute_us"] == 4 and s["collective_us"] == 20
    assert s["collective_overlapped_us"] == 4 and s["overlap_fraction"] == pytest.approx(0.2)
    assert overlap_summary([("gemm", 0, 8, "A")])["overlap_fraction"] is None
    with pytest.raises(ValueError, match="steps"):
        overlap_summary(ev, steps=0)


def test_overlap_equals_a_brute_force_count_on_a_time_grid():
    rng = np.random.RandomState(0)
    for trial in range(20):
        ev = []
        for _ in range(rng.randint(1, 30)):
            name = NCCL if rng.rand() < 0.3 else ("MemcpyH2D" if rng.rand() < 0.2 else "fusion")
            ev.append((name, int(rng.randint(0, 200)), int(rng.randint(0, 40)), int(rng.randint(0, 3))))
        busy = np.zeros((3, 240), bool)          # compute busy per stream and microsecond
        for n, t, d, st in ev:
            if classify(n) == "compute":
                busy[st, t:t + d] = True
        want = sum(np.any(np.delete(busy, st, axis=0)[:, t:t + d], axis=0).sum()
                   for n, t, d, st in ev if classify(n) == "collective")
        assert overlap_summary(ev)["collective_overlapped_us"] == want, trial


def _trace():
    meta = [dict(ph="M", pid=1, name="process_name", args=dict(name="/host:CPU")),
            dict(ph="M", pid=2, name="process_name", args=dict(name="/device:GPU:0")),
            dict(ph="M", pid=3, name="process_name", args=dict(name="/device:GPU:1"))]
    for pid in (2, 3):
        meta += [dict(ph="M", pid=pid, tid=7, name="thread_name", args=dict(name="Stream #7(Compute,MemcpyD2D)")),
                 dict(ph="M", pid=pid, tid=9, name="thread_name", args=dict(name="Stream #9(nccl)")),
                 dict(ph="M", pid=pid, tid=1, name="thread_name", args=dict(name="XLA Ops"))]
    x = lambda pid, tid, name, ts, dur: dict(ph="X", pid=pid, tid=tid, name=name, ts=ts, dur=dur)  # noqa: E731
    ev = [x(1, 5, "ThunkExecutor::Execute", 0, 100),
          # GPU 0: half of the all-to-all under a GEMM. The 'XLA Ops' line repeats ops over the whole window:
          # counted as a stream, it would hide all of it.
          x(2, 7, "gemm", 0, 10), x(2, 9, NCCL, 0, 20), x(2, 1, "fusion.3", 0, 40), x(2, 1, "all-to-all.1", 0, 20),
          # GPU 1: all of it hidden.
          x(3, 7, "gemm", 0, 30), x(3, 9, NCCL, 5, 20)]
    return dict(displayTimeUnit="ns", traceEvents=meta + ev)


def test_device_kernels_keep_the_stream_lines_of_each_device():
    kernels, seen = device_kernels(_trace())
    assert sorted(kernels) == ["/device:GPU:0", "/device:GPU:1"]
    assert [(e.name, e.stream) for e in kernels["/device:GPU:0"]] == [
        ("gemm", "Stream #7(Compute,MemcpyD2D)"), (NCCL, "Stream #9(nccl)")]
    assert "/device:GPU:0: XLA Ops" in seen["device_threads"] and "/host:CPU" in seen["processes"]


def test_summarize_trace_file_per_device_and_mean(tmp_path):
    path = str(tmp_path / "perfetto_trace.json.gz")
    with gzip.open(path, "wt") as fh:
        json.dump(_trace(), fh)
    s = summarize_trace(path, steps=1)
    assert s["devices"]["/device:GPU:0"]["overlap_fraction"] == 0.5
    assert s["devices"]["/device:GPU:1"]["overlap_fraction"] == 1.0
    assert s["mean"]["collective_us"] == 20 and s["mean"]["overlap_fraction"] == 0.75
