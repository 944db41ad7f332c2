"""KFP v2 pipelines: ``train`` (photos + dance videos -> registered identity) and ``infer``.

Pipeline files only wire tasks, resources and parameters. The Kubernetes settings below are part of
the compiled IR; KFP's local runner ignores them (and resource requests), so the pipeline that runs
locally is the one that is submitted. The names match ``infra/k8s/`` (``tests/test_infra.py``).
"""

from kfp import kubernetes

# infra/k8s/kfp-profile.yaml: read-only volume of model weights (model.weights_dir=/models/...).
MODELS_PVC = "faceid-models"
MODELS_MOUNT = "/models"
# infra/k8s/kfp-profile.yaml: MLflow server address (used when the mlflow_uri parameter is "")
# and credentials, as environment variables of the tasks that log to MLflow.
MLFLOW_SECRET = "faceid-mlflow"
MLFLOW_SECRET_ENV = {
    "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")  # set by the NVIDIA GPU operator


def on_cpu(task, cpu: str = "2", memory: str = "8Gi"):
    """A CPU task (faces, pose)."""
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    return task


def on_gpu(task, cpu: str = "8", memory: str = "48Gi", gpus: int = 1):
    """A task on one NVIDIA GPU node, with the model weights volume and the MLflow secret."""
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
    kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
    kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    kubernetes.mount_pvc(task, pvc_name=MODELS_PVC, mount_path=MODELS_MOUNT)
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET, secret_key_to_env=MLFLOW_SECRET_ENV, optional=True)
    return task
