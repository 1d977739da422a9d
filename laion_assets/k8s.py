"""How steps are shaped on Kubernetes (infra/README.md): the `dagster-k8s/config` op tags of the assets, which the
k8s executor (`LAION_ASSETS_EXECUTOR=k8s`, one pod per step) reads; other executors ignore them.

A backfill puts a bucket's download and CLIP steps in one run, so GPUs are asked for per step, not per run: the
three `gpu`-pool assets get one GPU, the GPU nodes' selector and toleration, the CUDA image
(`LAION_ASSETS_GPU_IMAGE`) and a memory-backed /dev/shm for the decode workers; the CPU-heavy steps get the
CPU and memory they need, with a limit beside every request (a request alone would meet the inherited limit).
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
CPU_STEPS: dict[str, dict[str, Any]] = {
    "image_shards": {"container_config": {"resources": {"requests": {"cpu": "15", "memory": "24Gi"},
                                                        "limits": {"memory": "24Gi"}}},
                     "pod_spec_config": {"node_selector": {"laion-assets/pool": "download"}}},
    "unique_pairs": {"container_config": {"resources": {"requests": {"memory": "48Gi"}, "limits": {"memory": "48Gi"}}}},
    "candidate_pairs": {"container_config": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"},
                                                           "limits": {"memory": "4Gi"}}}},
    "safety_scores": {"container_config": {"resources": {"requests": {"memory": "8Gi"}, "limits": {"memory": "8Gi"}}}},
    # The release stage holds one bucket (and the image dedup one spilled partition) at a time: a few GiB whatever
    # the crawl's size; the indices take IndexSettings.build_memory (4G) for autofaiss, plus its metadata and a
    # margin, and every core it is given.
    "image_dedup": {"container_config": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"},
                                                       "limits": {"memory": "4Gi"}}}},
    "filtered_metadata": {"container_config": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"},
                                                             "limits": {"memory": "4Gi"}}}},
    "release": {"container_config": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"},
                                                   "limits": {"memory": "4Gi"}}}},
    "knn_index": {"container_config": {"resources": {"requests": {"cpu": "8", "memory": "12Gi"},
                                                     "limits": {"memory": "12Gi"}}}},
    "knn_index_all": {"container_config": {"resources": {"requests": {"cpu": "8", "memory": "12Gi"},
                                                         "limits": {"memory": "12Gi"}}}},
}
GPU_ASSETS = frozenset({"clip_scores", "image_embeddings", "watermark_scores"})


def op_tags(asset: str, ops: OperationsSettings) -> dict[str, str]:
    """The asset's `dagster-k8s/config` tag ({} for steps that need nothing beyond the code server's size)."""
    if asset in GPU_ASSETS:
        config = json.loads(json.dumps(GPU_STEP))
        if ops.gpu_image:
            config["container_config"]["image"] = ops.gpu_image
    elif asset in CPU_STEPS:
        config = CPU_STEPS[asset]
    else:
        return {}
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
