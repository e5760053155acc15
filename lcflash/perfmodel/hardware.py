"""Accelerators, interconnects and achievable-efficiency assumptions for the decode performance model.

Every constant is a vendor datasheet figure or a published measurement; the source sits next to it. Peaks are
dense (no 2:4 sparsity). Bandwidths are bytes/s; link bandwidths are per GPU and per direction.

* H100 SXM5 / H800 SXM5 compute and HBM: NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: 989.4 TFLOP/s BF16,
  1978.9 TFLOP/s FP8, 494.7 TFLOP/s TF32, 3.35 TB/s HBM3, 80 GB). The H800 is the export variant of the H100 SXM5
  with the same SMs and HBM; only NVLink (and FP64) is cut.
* NVLink: H100 SXM 900 GB/s total (450 GB/s per direction); H800 400 GB/s total (200 GB/s per direction).
  deepseek-ai/DeepEP README measures ~153-158 GB/s intranode on H800 ("~160 GB/s NVLink maximum bandwidth").
* Inter-node: one ConnectX-7 400 Gb/s InfiniBand NIC per GPU = 50 GB/s per direction (DeepEP README: "CX7
  InfiniBand 400 Gb/s RDMA network card (~50 GB/s maximum bandwidth)"), the usual 8-NIC HGX build.
* H200 SXM: NVIDIA H200 datasheet (same compute as H100 SXM, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s).
* Latencies are estimates, not measurements: ~3 us for a GPU-initiated RDMA all-to-all round (IB small-message
  latency plus signalling), ~2 us for an NVLink collective. They cost <1% of a step at the report's batch.
"""

from __future__ import annotations

import dataclasses

TB = 1e12
GB = 1e9

# FLOP-rate keys a component may ask for. tf32 is what fp32 matmuls run at on tensor cores (router GEMMs).
FLOP_DTYPES = ("fp8", "bf16", "tf32")


class HardwareError(ValueError):
    """A hardware or efficiency value is impossible; the message names the field and what would be valid."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """One GPU type in an HGX-style cluster: per-GPU peaks and per-GPU link bandwidths."""

    name: str
    bf16_flops: float
    fp8_flops: float
    hbm_bw: float
    hbm_bytes: float
    nvlink_bw: float
    rdma_bw: float
    nvlink_latency: float = 2e-6
    rdma_latency: float = 3e-6
    gpus_per_node: int = 8

    def peak(self, dtype: str) -> float:
        if dtype == "fp8":
            return self.fp8_flops
        if dtype == "bf16":
            return self.bf16_flops
        if dtype == "tf32":
            return self.bf16_flops / 2  # H100/H800 datasheet: TF32 dense is half the BF16 rate
        raise HardwareError(f"no peak for dtype {dtype!r}; valid: {FLOP_DTYPES}")

    def replace(self, **kw) -> "Cluster":
        return validate_cluster(dataclasses.replace(self, **kw))


def validate_cluster(c: Cluster) -> Cluster:
    for f in ("bf16_flops", "fp8_flops", "hbm_bw", "hbm_bytes", "nvlink_bw", "rdma_bw"):
        v = getattr(c, f)
        if not (isinstance(v, (int, float)) and v > 0):
            raise HardwareError(f"cluster {c.name!r}: {f} = {v!r} is invalid: must be > 0")
    for f in ("nvlink_latency", "rdma_latency"):
        v = getattr(c, f)
        if not (isinstance(v, (int, float)) and v >= 0):
            raise HardwareError(f"cluster {c.name!r}: {f} = {v!r} is invalid: must be >= 0 seconds")
    if not (isinstance(c.gpus_per_node, int) and c.gpus_per_node >= 1):
        raise HardwareError(f"cluster {c.name!r}: gpus_per_node = {c.gpus_per_node!r} must be a positive integer")
    return c


H800 = Cluster(name="h800", bf16_flops=989.4e12, fp8_flops=1978.9e12, hbm_bw=3.35 * TB, hbm_bytes=80 * GB,
               nvlink_bw=200 * GB, rdma_bw=50 * GB)
H100 = Cluster(name="h100", bf16_flops=989.4e12, fp8_flops=1978.9e12, hbm_bw=3.35 * TB, hbm_bytes=80 * GB,
               nvlink_bw=450 * GB, rdma_bw=50 * GB)
H200 = Cluster(name="h200", bf16_flops=989.4e12, fp8_flops=1978.9e12, hbm_bw=4.8 * TB, hbm_bytes=141 * GB,
               nvlink_bw=450 * GB, rdma_bw=50 * GB)


# Dense bf16 peaks by the name JAX gives a device (`jax.Device.device_kind`, e.g. "NVIDIA H100 80GB HBM3"), for MFU.
# First match wins. PCIe and NVL boards run lower clocks than the SXM clusters above, so they get no peak (None)
# rather than a wrong one. A100 SXM: 312 TFLOP/s dense BF16 (NVIDIA A100 datasheet).
_PEAK_BF16_BY_KIND = (("PCIe", None), ("NVL", None), ("H100", H100.bf16_flops), ("H800", H800.bf16_flops),
                      ("H200", H200.bf16_flops), ("A100", 312e12))


def peak_bf16_flops(device_kind: str) -> float | None:
    """The datasheet dense bf16 peak of one device of this kind, or None where it is not known."""
    for key, peak in _PEAK_BF16_BY_KIND:
        if key.lower() in device_kind.lower():
            return peak
    return None


CLUSTERS = {c.name: c for c in (H800, H100, H200)}


def get_cluster(name_or_cluster, **overrides) -> Cluster:
    """Looks a cluster up by name (or passes a Cluster through) and applies field overrides (None = keep)."""
    if isinstance(name_or_cluster, Cluster):
        base = name_or_cluster
    elif name_or_cluster in CLUSTERS:
        base = CLUSTERS[name_or_cluster]
    else:
        raise HardwareError(f"unknown cluster {name_or_cluster!r}; valid: {sorted(CLUSTERS)}")
    kw = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(Cluster)})
    if unknown:
        raise HardwareError(f"unknown cluster field(s) {unknown}")
    return base.replace(**kw) if kw else validate_cluster(base)


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Achievable fraction of each peak; one set shared by every model (no per-model factors).

    Two profiles: PEAK (all 1.0: datasheet peaks, the report's "theoretical" framing; the CLI default) and
    ACHIEVABLE (the field defaults below), the best published Hopper kernel measurements:
    * hbm 0.90: FlashMLA decode reaches 3000 GB/s of 3350 on H800 (deepseek-ai/FlashMLA README). Optimistic for
      small-M GEMMs: DeepGEMM's M=64/128 FP8 GEMMs reach 1.5-2.7 TB/s (deepseek-ai/DeepGEMM README).
    * gemm 0.60: DeepGEMM FP8 on H800 reaches 815-1233 TFLOP/s (41-62%) for decode-layout (masked) grouped GEMMs
      and 1025-1358 TFLOP/s (52-69%) for large dense GEMMs; 0.60 sits at the top of the grouped range.
    * attention 0.667: FlashMLA decode reaches 660 TFLOP/s BF16 compute-bound on H800 (README, CUDA 12.8).
      Applied to GQA decode attention too (no comparable published figure was used for it).
    * network 0.80: DeepEP low-latency all-to-all reaches 39-40 GB/s of the 50 GB/s NIC at EP=128/256 on H800
      (README table, 128 tokens, hidden 7168, top-8), counting every (token, expert) copy; applied to NVLink too
      (DeepEP intranode: 153-158 of ~160-200 GB/s).
    * op_overhead: fixed seconds added to every compute op (kernel launch / tail); 0 under CUDA graphs.
    """

    hbm: float = 0.90
    gemm: float = 0.60
    attention: float = 0.667
    network: float = 0.80
    op_overhead: float = 0.0

    def replace(self, **kw) -> "Efficiency":
        return validate_efficiency(dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None}))


def validate_efficiency(e: Efficiency) -> Efficiency:
    for f in ("hbm", "gemm", "attention", "network"):
        v = getattr(e, f)
        if not (isinstance(v, (int, float)) and 0 < v <= 1):
            raise HardwareError(f"efficiency.{f} = {v!r} is invalid: must be in (0, 1]")
    if not (isinstance(e.op_overhead, (int, float)) and e.op_overhead >= 0):
        raise HardwareError(f"efficiency.op_overhead = {e.op_overhead!r} is invalid: must be >= 0 seconds")
    return e


ACHIEVABLE = Efficiency()
PEAK = Efficiency(hbm=1.0, gemm=1.0, attention=1.0, network=1.0)
EFFICIENCY_PROFILES = {"achievable": ACHIEVABLE, "peak": PEAK}
