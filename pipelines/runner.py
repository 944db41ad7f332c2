"""``faceid pipeline {compile,run,submit}``: the KFP pipelines compiled, run locally, or submitted.

The pipelines (``faceid_pipelines.train`` / ``.train_shared`` / ``.infer``) only wire tasks; their components
(``faceid_components``) each call one typed stage function of the library (``faceid.stages``).
This runner is a door too: the library never imports it.

Pipeline parameters that mean "take it from params.yaml" are sentinels: ``""`` for strings,
``-1`` for step counts and any negative value for scales (``face_scale`` 0 is a real value: the
base model). Their defaults live in ``params.yaml`` only.

kfp is imported inside the functions that need it (the CLI stays fast).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from faceid.errors import FaceidError
from faceid_pipelines.local_output import quiet_output

PIPELINE_NAMES = ("train", "train-shared", "infer")


# --------------------------------------------------------------------------- pipelines


def pipeline_func(name: str):
    if name == "train":
        from faceid_pipelines.train import train_pipeline

        return train_pipeline
    if name == "train-shared":
        from faceid_pipelines.train_shared import train_shared_pipeline

        return train_shared_pipeline
    if name == "infer":
        from faceid_pipelines.infer import infer_pipeline

        return infer_pipeline
    raise FaceidError(f"unknown pipeline {name!r} (expected one of {', '.join(PIPELINE_NAMES)})")


def compile_pipelines(output_dir: Path) -> list[Path]:
    """Write ``<output_dir>/<name>.yaml`` of every pipeline (``train``, ``train-shared``, ``infer``; KFP v2 IR, for
    any KFP v2 backend)."""
    from kfp import compiler

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PIPELINE_NAMES:
        path = output_dir / f"{name}.yaml"
        compiler.Compiler().compile(pipeline_func(name), str(path))
        print(f"pipeline {name}: {path}")
        paths.append(path)
    return paths


_KFP_TYPES = {"String": str, "Integer": int, "Float": float, "Boolean": bool}  # ComponentSpec input types


def parse_arguments(name: str, arguments: list[str] | dict[str, Any]) -> dict[str, Any]:
    """``["identity=obama", "stage1_steps=5"]`` -> typed pipeline arguments; unknown names are errors."""
    spec = pipeline_func(name).component_spec.inputs or {}
    items = arguments.items() if isinstance(arguments, dict) else [_split(a) for a in arguments]
    out: dict[str, Any] = {}
    for key, value in items:
        if key not in spec:
            raise FaceidError(f"pipeline {name}: unknown parameter {key!r} (parameters: {', '.join(spec)})")
        tp = _KFP_TYPES.get(spec[key].type, str)
        out[key] = _convert(name, key, value, tp)
    return out


def _split(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise FaceidError(f"pipeline argument {text!r}: expected NAME=VALUE, e.g. identity=obama")
    key, value = text.split("=", 1)
    return key.strip(), value


def _convert(name: str, key: str, value: Any, tp: type) -> Any:
    if not isinstance(value, str) or tp is str:
        return value
    try:
        if tp is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError(value)
            return value.lower() == "true"
        return tp(value)
    except ValueError:
        raise FaceidError(f"pipeline {name}: parameter {key}={value!r}: expected {tp.__name__}") from None


def required_parameters(name: str) -> list[str]:
    spec = pipeline_func(name).component_spec.inputs or {}
    return [k for k, v in spec.items() if v.default is None and not v.optional]


def check_required(name: str, args: dict[str, Any]) -> None:
    missing = [k for k in required_parameters(name) if k not in args]
    if missing:
        raise FaceidError(f"pipeline {name}: missing parameter(s) {', '.join(missing)} (pass --arg NAME=VALUE)")


# --------------------------------------------------------------------------- local run


def run_local(params, name: str, arguments: list[str] | dict[str, Any], params_path: Path, mlflow_uri: str,
              verbose: bool = False) -> dict[str, str]:
    """Run pipeline ``name`` with KFP's local SubprocessRunner (no Docker, no cluster).

    1. The resolved params (``--set`` overrides applied) go to ``<pipeline_root>/params-<hash>.yaml``;
       every task reads that file, so ``faceid --set ... pipeline run`` reaches every stage.
    2. Inputs not given (``identity``, ``identity_photos``, ``people_photos``, ``dance_videos``) come from
       the sample data (``people_photos``: its ``people/``), written first by the ``sample_data`` component
       under the same pipeline root.
    3. The DAG runs task by task in this environment; MLflow logs to ``mlflow_uri``.
    Quiet unless ``verbose``: a start and a done line per task around what the task prints itself
    (its summary, its progress bars, any error in full), without KFP's executor input JSON, task
    outputs and warnings, all of which still go to ``<pipeline_root>/logs/<name>-<time>.log``
    (:func:`faceid_pipelines.local_output.quiet_output`). ``verbose``: KFP's own output, as it prints it.
    Returns the output artifact paths of the run.
    """
    import yaml
    from kfp import local

    from faceid.config import PROFILES_DIR, config_hash, to_dict

    args = parse_arguments(name, arguments)
    root = Path(params.pipeline.pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)

    # 1. Resolved params, one file per distinct config.
    resolved = root / f"params-{config_hash(params)}.yaml"
    resolved.write_text(f"# resolved from {params_path} with overrides; written by faceid pipeline run\n"
                        + yaml.safe_dump(to_dict(params), sort_keys=False))
    profiles = Path(params_path).parent / PROFILES_DIR  # the tasks find profile overlays beside their params file
    if profiles.is_dir():
        shutil.copytree(profiles, root / PROFILES_DIR, dirs_exist_ok=True)
    args.setdefault("params_path", str(resolved))
    args.setdefault("mlflow_uri", mlflow_uri)

    log = root / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    where = "" if verbose else f"; full log {log}"
    with contextlib.nullcontext() if verbose else quiet_output(log):
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)

        # 2. Sample data for whatever input is missing.
        wanted = [k for k in ("identity_photos", "people_photos", "dance_videos")
                  if k in required_parameters(name) and not args.get(k)]
        if wanted:
            sample = _local_sample_data(args["params_path"], where)
            from faceid.sample_data import IDENTITY_NAME

            if "identity" in required_parameters(name):
                args.setdefault("identity", IDENTITY_NAME)
            if "identity_photos" in wanted:
                photos = sample / "identities" / args["identity"]
                if not photos.is_dir():
                    raise FaceidError(f"no photos given for identity {args['identity']!r} and the sample data has none "
                                      f"({photos}); pass --arg identity_photos=FOLDER")
                args["identity_photos"] = str(photos)
            if "people_photos" in wanted:
                args["people_photos"] = str(sample / "people")
            if "dance_videos" in wanted:
                args["dance_videos"] = str(sample / "videos")
            print(f"pipeline {name}: inputs from the sample data: " + ", ".join(f"{k}={args[k]}" for k in wanted))
        check_required(name, args)

        # 3. The DAG.
        started = time.monotonic()
        try:
            task = pipeline_func(name)(**args)
        except RuntimeError as exc:
            raise FaceidError(f"pipeline {name} failed: {_plain(exc)} (task logs above{where}; artifacts under {root})") from None
        outputs = {key: artifact.path for key, artifact in (task.outputs or {}).items()}
        print(f"pipeline {name}: done in {time.monotonic() - started:.0f} s; artifacts under {root}")
        for key, path in outputs.items():
            print(f"  {key}: {path}")
        if not verbose:
            print(f"  log: {log}  (with KFP's detail; -v prints it)")
        print(f"  MLflow: {args['mlflow_uri']}  (mlflow ui --backend-store-uri {args['mlflow_uri']})")
    return outputs


def _plain(exc: Exception) -> str:
    """The local runner's message without its terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))


def _local_sample_data(params_path: str, where: str = "") -> Path:
    """Run the ``sample_data`` component on its own (KFP local task); return its output folder."""
    from faceid_components.sample_data import sample_data

    try:
        task = sample_data(params_path=params_path)
    except RuntimeError as exc:
        raise FaceidError(f"sample-data failed: {_plain(exc)} (task logs above{where})") from None
    return Path(task.outputs["sample"].path)


# --------------------------------------------------------------------------- cluster


def check_reachable(host: str, timeout: float = 10.0) -> None:
    """Raise a FaceidError unless ``host`` answers HTTP at all (any status, auth redirects included)."""
    parsed = urllib.parse.urlparse(host)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise FaceidError(f"--host {host!r}: expected an http(s) URL, e.g. http://localhost:8080 "
                          "(kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80)")
    try:
        urllib.request.urlopen(host.rstrip("/") + "/apis/v2beta1/healthz", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (401/403/404 behind an auth proxy still means reachable)
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FaceidError(
            f"cannot reach Kubeflow Pipelines at {host} ({reason}). Check the URL and your network, e.g. "
            "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` then --host http://localhost:8080"
        ) from None


def submit(name: str, host: str, arguments: list[str] | dict[str, Any], namespace: str | None = None,
           experiment: str = "faceid") -> str:
    """Submit pipeline ``name`` to the KFP v2 API at ``host`` (any KFP v2 backend; Argo on Kubeflow).

    Every required parameter must be given (``identity``, data URIs such as ``s3://bucket/photos``);
    on the cluster the tasks read the params.yaml baked into the image unless ``params_path`` is set.
    Returns the run id.
    """
    args = parse_arguments(name, arguments)
    check_required(name, args)
    check_reachable(host)

    import kfp

    try:
        client = kfp.Client(host=host, namespace=namespace)
        run = client.create_run_from_pipeline_func(
            pipeline_func(name), arguments=args, experiment_name=experiment,
            run_name="-".join(x for x in ("faceid", name, args.get("identity", ""), time.strftime("%Y%m%d-%H%M%S")) if x),
            namespace=namespace)
    except FaceidError:
        raise
    except Exception as exc:  # kfp_server_api / urllib3 errors: one clear line
        raise FaceidError(f"submitting pipeline {name} to {host} failed: {type(exc).__name__}: {exc}") from None
    print(f"pipeline {name}: submitted run {run.run_id} to {host} (experiment {experiment})")
    return run.run_id
