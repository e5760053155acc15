"""Analytical decode performance model: per-component roofline times, overlap schedules, TPOT and cost.

Entry points: `estimate_step(spec, cluster, workload)` for a cluster deployment, `predict_decode_step(model_cfg,
cluster, batch, context)` for one GPU, and `python -m lcflash.perfmodel` for the command line.
"""

from lcflash.perfmodel.estimate import Component, Workload, WorkloadError, memory_per_gpu, step_components
from lcflash.perfmodel.hardware import (ACHIEVABLE, CLUSTERS, EFFICIENCY_PROFILES, PEAK, Cluster, Efficiency,
                                        HardwareError, get_cluster)
from lcflash.perfmodel.models import BASELINES, ModelSpec, deepseek_v3, from_lcflash, qwen3_235b_a22b
from lcflash.perfmodel.schedule import (SCHEDULES, StepEstimate, default_schedule, estimate_step,
                                        predict_decode_step, simulate)

__all__ = ["ACHIEVABLE", "BASELINES", "CLUSTERS", "Cluster", "Component", "EFFICIENCY_PROFILES", "Efficiency",
           "HardwareError", "ModelSpec", "PEAK", "SCHEDULES", "StepEstimate", "Workload", "WorkloadError",
           "deepseek_v3", "default_schedule", "estimate_step", "from_lcflash", "get_cluster", "memory_per_gpu",
           "predict_decode_step", "qwen3_235b_a22b", "simulate", "step_components"]
