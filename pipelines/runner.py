"""``faceid pipeline {compile,run,submit}``: the KFP pipelines compiled, run locally, or submitted.

The pipelines (``faceid_pipelines.train`` / ``.infer``) only wire tasks; their components
(``faceid_components``) each call one typed stage function of the library (``faceid.stages``).
This runner is a door too: the library never imports it.

Pipeline parameters that mean "take it from params.yaml" are sentinels: ``""`` for strings,
``-1`` for step counts and any negative value for scales (``face_scale`` 0 is a real value: the
base model). Their defaults live in ``params.yaml`` only.

kfp is imported inside the functions that need it (the CLI stays fast).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from faceid.errors import FaceidError

PIPELINE_NAMES = ("train", "infer")


# --------------------------------------------------------------------------- pipelines


def pipeline_func(name: str):
    if name == "train":
        from faceid_pipelines.train import train_pipeline

        return train_pipeline
    if name == "infer":
        from faceid_pipelines.infer import infer_pipeline

        return infer_pipeline
    raise FaceidError(f"unknown pipeline {name!r} (expected one of {', '.join(PIPELINE_NAMES)})")


def compile_pipelines(output_dir: Path) -> list[Path]:
    """Write ``<output_dir>/train.yaml`` and ``infer.yaml`` (KFP v2 IR, for any KFP v2 backend)."""
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
    2. Inputs not given (``identity``, ``identity_photos``, ``dance_videos``) come from the sample
       data, written first by the ``sample_data`` component under the same pipeline root.
    3. The DAG runs task by task in this environment; MLflow logs to ``mlflow_uri``.
    Quiet unless ``verbose``: a start and a done line per task around what the task prints itself
    (its summary, its progress bars, any error in full), without KFP's executor input JSON, task
    outputs and warnings, all of which still go to ``<pipeline_root>/logs/<name>-<time>.log``
    (:func:`_quiet_output`). ``verbose``: KFP's own output, as it prints it.
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
    with contextlib.nullcontext() if verbose else _quiet_output(log):
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)

        # 2. Sample data for whatever input is missing.
        wanted = [k for k in ("identity_photos", "dance_videos") if k in required_parameters(name) and not args.get(k)]
        if wanted:
            sample = _local_sample_data(args["params_path"], where)
            from faceid.sample_data import IDENTITY_NAME

            args.setdefault("identity", IDENTITY_NAME)
            if "identity_photos" in wanted:
                photos = sample / "identities" / args["identity"]
                if not photos.is_dir():
                    raise FaceidError(f"no photos given for identity {args['identity']!r} and the sample data has none "
                                      f"({photos}); pass --arg identity_photos=FOLDER")
                args["identity_photos"] = str(photos)
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


# --------------------------------------------------------------------------- local run: quiet output
#
# KFP's local runner has no quiet switch: it logs each task's start, status and outputs on the root
# logger (a handler on stdout it installs per call), and prints each task subprocess's output line
# by line with print() (kfp/local/subprocess_task_handler.py), that output starting with the KFP
# executor's INFO lines and the task's whole executor input as JSON (kfp/dsl/executor_main.py sets
# its level; nothing reaches it). So, for a quiet run (:func:`_quiet_output`): a filter on the root
# logger turns KFP's task records into one line each, stdout is a stream that drops the executor's
# INFO lines and JSON, and two KFP warnings that are expected locally are ignored. Everything else
# a task prints (its summary, its errors, tracebacks) passes as it is, and every line, dropped or
# not, goes to the run's log file.

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTOR_INFO = re.compile(r"\[KFP Executor [^\]]* INFO\]: ")  # its WARNING/ERROR lines are kept
_STARTED = re.compile(r"Executing task '(?P<task>[^']+)'$")
_FINISHED = re.compile(r"Task '(?P<task>[^']+)' finished with status (?P<status>\w+)$")
_KFP_CHATTER = re.compile(r"Streamed logs:|Task '[^']+' (outputs:|has no outputs)|Running pipeline: "
                          r"|Pipeline '[^']+' finished with status SUCCESS|Cleaned up workspace: ")
_IMPORTER = re.compile(r"importer(-\d+)?$")  # KFP's importer tasks: the inputs, nothing runs
# tqdm's default bar: "desc: 42%|████▏     | 5/12 [00:03<00:04,  1.7it/s, loss=...]" (maybe more text after)
_BAR = re.compile(r"(?P<desc>.*?)\s*(?P<pct>\d+)%\|[^|]*\|\s*[\d.]+[kMG]?/[\d.]+[kMG]? \[[^\]]*\]")
_KFP_LOCAL_WARNINGS = (  # (message regex, category): what KFP warns about every task of a local run
    (r"Task '.*': settings \[.*\] have no effect in the current local runner", UserWarning),
    (r"You may be attemping to run a task that uses custom or non-Python base image", RuntimeWarning),
)


@contextlib.contextmanager
def _quiet_output(log_path: Path):
    """For the block: KFP's output quiet (see above) and whole in ``log_path``. MLflow's artifact
    download bars (a model is downloaded back when logged) are off in the tasks unless the
    environment sets ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8", errors="replace", buffering=1) as log, \
            warnings.catch_warnings(), _env_default("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
        for message, category in _KFP_LOCAL_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        out = _QuietStream(sys.stdout, log)
        records = _KfpRecords(out)
        root = logging.getLogger()  # KFP logs with logging.info(): records of the root logger itself
        root.addFilter(records)
        try:
            with contextlib.redirect_stdout(out):
                yield
        finally:
            root.removeFilter(records)
            out.end()


@contextlib.contextmanager
def _env_default(name: str, value: str):
    """``os.environ[name] = value`` for the block (the tasks inherit it) unless it is set already."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


class _KfpRecords(logging.Filter):
    """KFP's records: a task's start and end become one line each (importer tasks none); the rest of
    its INFO chatter is dropped; warnings and errors are kept. All go to the log file."""

    def __init__(self, out: _QuietStream):
        super().__init__()
        self.out = out
        self.started: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", record.getMessage())
        keep = self._keep(record, message)
        if not keep:  # a kept one reaches the log file through stdout
            self.out.log_line(f"{time.strftime('%H:%M:%S')} {record.levelname} - {message}")
        return keep

    def _keep(self, record: logging.LogRecord, message: str) -> bool:
        if m := _STARTED.match(message):
            self.started[m["task"]] = time.monotonic()
            if not _IMPORTER.match(m["task"]):
                self.out.say(f"[{m['task']}] started")
            return False
        if m := _FINISHED.match(message):
            task, ok = m["task"], m["status"] == "SUCCESS"
            seconds = time.monotonic() - self.started.pop(task, time.monotonic())
            if ok and _IMPORTER.match(task):
                return False
            self.out.say(f"[{task}] done in {seconds:.0f} s" if ok else
                         f"[{task}] {m['status']} after {seconds:.0f} s (its output is above; full log {self.out.log.name})")
            return False
        if record.levelno < logging.WARNING and _KFP_CHATTER.match(message):
            return False
        return record.levelno >= logging.WARNING or "cache hit" in message or "failed (attempt" in message


class _QuietStream(io.TextIOBase):
    """Stands for stdout while KFP prints the tasks' output: every line goes to the log file; on the
    terminal, the KFP executor's INFO lines, the executor input JSON after them, blank lines and KFP's
    rules are dropped, and a progress bar (tqdm: its updates arrive as lines, the subprocess's ``\\r``
    read as line ends) is redrawn in place on a terminal, or written once, at its last state, elsewhere."""

    def __init__(self, stream, log):
        super().__init__()
        self.stream, self.log = stream, log
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.pending = ""  # a line not finished yet
        self.in_json = False
        self.bar: tuple[str, int, str] | None = None  # (description, percent, line) of the open bar

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def isatty(self) -> bool:
        return self.tty

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.log.write(_ANSI.sub("", line) + "\n")
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def log_line(self, text: str) -> None:
        self.log.write(text + "\n")

    def say(self, text: str) -> None:
        """A line of the runner's own (not in the log file twice: the record is there)."""
        self._end_bar()
        self.in_json = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.pending:
            self.write("\n")
        self._end_bar()
        self.stream.flush()

    def _line(self, line: str) -> None:
        body = line.strip()
        if self.in_json:  # json.dumps(indent=4) of the executor input, indented 4 more by KFP
            inner = line[4:] if line.startswith("    ") else line
            if inner[:1] in ("{", "}", " ", '"', "]", "["):
                self.in_json = inner.rstrip() != "}"
                return
            self.in_json = False
        if _EXECUTOR_INFO.search(body):
            self.in_json = body.endswith("Got executor_input:")
            return
        if not body or (len(body) >= 20 and set(body) == {"-"}):
            return
        if m := _BAR.match(line):
            self._bar(m["desc"].strip(), int(m["pct"]), m[0])
            rest = line[m.end():]
            if rest.strip():
                self._line(" " * (len(line) - len(line.lstrip())) + rest)
            return
        self._end_bar()
        self.stream.write(line + "\n")
        self.stream.flush()

    def _bar(self, desc: str, pct: int, line: str) -> None:
        if self.bar and (self.bar[0] != desc or pct < self.bar[1]):
            self._end_bar()  # another bar
        self.bar = (desc, pct, line)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()

    def _end_bar(self) -> None:
        if self.bar:
            self.stream.write("\n" if self.tty else self.bar[2] + "\n")
            self.bar = None


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
            run_name=f"faceid-{name}-{args.get('identity', '')}-{time.strftime('%Y%m%d-%H%M%S')}",
            namespace=namespace)
    except FaceidError:
        raise
    except Exception as exc:  # kfp_server_api / urllib3 errors: one clear line
        raise FaceidError(f"submitting pipeline {name} to {host} failed: {type(exc).__name__}: {exc}") from None
    print(f"pipeline {name}: submitted run {run.run_id} to {host} (experiment {experiment})")
    return run.run_id
