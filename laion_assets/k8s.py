"""How steps are shaped on Kubernetes (infra/README.md): each asset declares its pod in its own `op_tags`
(`cpu_pod(...)` or `gpu_pod(ops)`: the `dagster-k8s/config` tag, which the k8s executor, `LAION_ASSETS_EXECUTOR=k8s`,
one pod per step, reads; other executors ignore it), and `executor` picks the executor.

A backfill puts a bucket's download and CLIP steps in one run, so GPUs are asked for per step, not per run: the
`gpu`-pool assets get one GPU, the GPU nodes' selector and toleration, the CUDA image (`LAION_ASSETS_GPU_IMAGE`)
and a memory-backed /dev/shm for the decode workers; the CPU-heavy steps get the CPU and memory they need, with a
limit beside every request (a request alone would meet the inherited limit).
"""

from __future__ import annotations

import json
from typing import Any

import dagster as dg

from laion_assets.core.settings import OperationsSettings

GPU_STEP: dict[str, Any] = {
    "container_config": {
        "resources": {"requests": {"cpu": "16", "memory": "80Gi", "nvidia.com/gpu": "1"},
                      "limits": {"memory": "96Gi", "nvidia.com/gpu": "1"}},
        "volume_mounts": [{"name": "dshm", "mount_path": "/dev/shm"}],
    },
    "pod_spec_config": {
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": [{"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": "16Gi"}}],
    },
}

def cpu_pod(cpu: str | None = None, memory: str | None = None, node_pool: str | None = None) -> dict[str, str]:
    """The `dagster-k8s/config` op tag of a CPU step: what it requests, a memory limit equal to the request, and the
    node pool it needs (the `laion-assets/pool` node label)."""
    requests = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
    config: dict[str, Any] = {"container_config": {"resources": {"requests": requests}}}
    if memory:
        config["container_config"]["resources"]["limits"] = {"memory": memory}
    if node_pool:
        config["pod_spec_config"] = {"node_selector": {"laion-assets/pool": node_pool}}
    return {"dagster-k8s/config": json.dumps(config, sort_keys=True)}


def gpu_pod(ops: OperationsSettings) -> dict[str, str]:
    """The op tag of a `gpu`-pool step: one GPU, the GPU nodes, the CUDA image when one is set."""
    config = json.loads(json.dumps(GPU_STEP))
    if ops.gpu_image:
        config["container_config"]["image"] = ops.gpu_image
    return {"dagster-k8s/config": json.dumps(config, sort_keys=True)}


def executor(ops: OperationsSettings) -> dg.ExecutorDefinition:
    """in_process (default: a run is one partition of a few dependent assets), multiprocess, or k8s (a pod per step;
    needs the `k8s` extra)."""
    if ops.executor == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if ops.executor == "multiprocess":
        return dg.multiprocess_executor
    if ops.executor == "in_process":
        return dg.in_process_executor
    raise ValueError(f"LAION_ASSETS_EXECUTOR must be in_process, multiprocess or k8s, not {ops.executor!r}")
