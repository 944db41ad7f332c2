"""Screenshots of the MLflow UI for docs/review.md (``make review-screenshots``; not part of CI).

    .venv/bin/python docs/screenshots.py            # the store `make demo` wrote (sqlite:///mlruns/mlflow.db)
    .venv/bin/python docs/screenshots.py --demo     # first run the training pipeline into a temporary store
    .venv/bin/python docs/screenshots.py --store sqlite:////path/mlflow.db --out docs/images

1. Find in the store the latest train-lora and render-validation runs (tag ``stage``) of the
   experiment ``tracking.experiment`` and the registered version of that identity (alias
   ``tracking.register_alias``).
2. Start ``mlflow server`` on 127.0.0.1 at a free port (loopback only), wait until it answers.
3. Take each page with Debian's headless chromium (``apt-get install chromium``), a virtual-time
   budget so the React UI has rendered; save PNGs (palette-reduced when large) into ``--out``.
4. Stop the server it started (its own process group), whatever happened.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WINDOW = (1400, 900)
MAX_BYTES = 300_000
# The UI opens its assistant panel (a quarter of the page) on a server it sees as local (hostname
# localhost / 127.0.0.1): the browser asks for this name instead, which chromium resolves to the
# loopback address by itself (RFC 6761); the server is still bound to 127.0.0.1 only.
HOST = "review.localhost"
ML_VIEW = "workflowType=machine_learning"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(tmp: Path) -> str:
    """The training pipeline (what `make demo` runs) with everything it writes under ``tmp``."""
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    (tmp / "mlruns").mkdir(parents=True, exist_ok=True)
    faceid = Path(sys.executable).parent / "faceid"
    subprocess.run([str(faceid), "--set", f"pipeline.pipeline_root={tmp / 'kfp'}", "--set", f"ray.storage_path={tmp / 'ray'}",
                    "--set", f"tracking.download_dir={tmp / 'identities'}", "pipeline", "run", "train", "--local",
                    "--mlflow-uri", uri], cwd=REPO, check=True)
    return uri


def find_pages(uri: str, experiment: str, alias: str) -> list[tuple[str, str]]:
    """``[(png name, URL fragment)]`` of the pages docs/review.md refers to."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():  # MLflow would create it
        sys.exit(f"{uri}: no such store; run `make demo` first (or pass --demo)")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"{uri}: no experiment {experiment!r}; run `make demo` first (or pass --demo)")

    def latest(stage: str):
        runs = client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'", order_by=["attributes.start_time DESC"],
                                  max_results=1)
        if not runs:
            sys.exit(f"{uri}: no {stage} run in experiment {experiment!r}; run `make demo` first (or pass --demo)")
        return runs[0]

    train, validation = latest("train_lora"), latest("render_validation")
    identity = train.data.tags["identity"]
    eid = exp.experiment_id
    sheets = [a.path for a in client.list_artifacts(validation.info.run_id, "side_by_side") if a.path.endswith(".png")]
    pages = [
        ("01-runs.png", f"#/experiments/{eid}/runs"),
        ("02-train-run.png", f"#/experiments/{eid}/runs/{train.info.run_id}"),
        ("03-train-charts.png", f"#/experiments/{eid}/runs/{train.info.run_id}/model-metrics"),
        ("04-validation-run.png", f"#/experiments/{eid}/runs/{validation.info.run_id}"),
    ]
    if sheets:
        pages.append(("05-side-by-side.png", f"#/experiments/{eid}/runs/{validation.info.run_id}/artifactPath/{sheets[0]}"))
    pages = [(name, f"{url}?{ML_VIEW}") for name, url in pages]  # the "Model training" side of the UI, not GenAI
    try:
        version = client.get_model_version_by_alias(f"faceid-{identity}", alias).version
        pages.append(("06-model-version.png", f"#/models/faceid-{identity}/versions/{version}"))
    except Exception as exc:  # no registry entry: the other pages are still worth having
        print(f"screenshots: no model version faceid-{identity}@{alias} ({str(exc).splitlines()[0]}); page skipped")
    return pages


def start_server(uri: str, port: int, log: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--allowed-hosts", f"{HOST}:{port},127.0.0.1:{port}",
                             "--cors-allowed-origins", f"http://{HOST}:{port}"],
                            cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"mlflow server exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    stop_server(proc)
    sys.exit(f"mlflow server did not answer on 127.0.0.1:{port} within 120 s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server this script started: its own process group (uvicorn and its worker)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def screenshot(chromium: str, url: str, path: Path, profile: Path, budget_ms: int) -> None:
    from PIL import Image

    args = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--virtual-time-budget={budget_ms}",
            "--run-all-compositor-stages-before-draw", f"--screenshot={path}", url]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
    if path.stat().st_size > MAX_BYTES:  # a UI screenshot has few colours: a palette keeps it sharp and small
        Image.open(path).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"screenshots: {path} ({path.stat().st_size // 1000} KB) <- {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}", help="MLflow tracking URI")
    parser.add_argument("--demo", action="store_true", help="first run the training pipeline into a temporary store")
    parser.add_argument("--out", default=str(REPO / "docs" / "images"))
    parser.add_argument("--experiment", default="faceid")
    parser.add_argument("--alias", default="candidate")
    parser.add_argument("--budget-ms", type=int, default=20000, help="chromium's virtual time for the page to render")
    args = parser.parse_args(argv)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("screenshots: chromium not found; install Debian's: apt-get install -y chromium")
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="faceid-screenshots-") as tmp:
        tmp = Path(tmp)
        uri = run_demo(tmp) if args.demo else args.store
        pages = find_pages(uri, args.experiment, args.alias)
        out.mkdir(parents=True, exist_ok=True)
        port = free_port()
        server = start_server(uri, port, tmp / "mlflow-server.log")
        try:
            for name, fragment in pages:
                screenshot(chromium, f"http://{HOST}:{port}/{fragment}", out / name, tmp / "chromium", args.budget_ms)
        finally:
            stop_server(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
