"""Kubernetes placement of runs and steps (read by dagster-k8s's K8sRunLauncher and
k8s_job_executor through the `dagster-k8s/config` tag; ignored by every other launcher,
so `make run` and docker-compose are unaffected).

Embedding work asks for one NVIDIA GPU on a node of the `gpu` pool (label
`cv-assets/pool: gpu`, tainted `nvidia.com/gpu` so nothing else lands there); every other
run uses the CPU pool set for all runs in deploy/helm/values.yaml (`runK8sConfig`).
"""

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_POOL_LABEL = "cv-assets/pool"

GPU_STEP_K8S_CONFIG = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"},
        },
    },
    "pod_spec_config": {
        "node_selector": {GPU_POOL_LABEL: "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}

# Tags for a job or an asset's op_tags whose work is embedding.
GPU_STEP_TAGS = {K8S_CONFIG_TAG: GPU_STEP_K8S_CONFIG}
