"""A real ``mlflow server`` on 127.0.0.1 (sqlite backend, proxied local artifact store): faceid logs
a run, a metric and an artifact over HTTP through ``faceid.tracking.using`` and reads them back.

This is the deployment shape of infra/k8s/mlflow.yaml (server with --serve-artifacts) without the
cluster: clients only need MLFLOW_TRACKING_URI, never the artifact store's credentials.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from faceid.tracking import URI_ENV, experiment_id, using

START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts", "--workers", "1"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {START_TIMEOUT_S} s:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_log_and_read_back_over_http(mlflow_server, tmp_path):
    import mlflow

    url, root = mlflow_server
    before = {name: os.environ.get(name) for name in URI_ENV}
    report = tmp_path / "report.json"
    report.write_text('{"facesim": 0.9}\n')
    with using(url, "faceid-server-test") as exp_id:
        assert experiment_id(url, "faceid-server-test") == exp_id  # idempotent
        with mlflow.start_run(run_name="http", experiment_id=exp_id) as run:
            mlflow.log_params({"train_lora.stage1.steps": 2, "model.profile": "tiny"})
            for step, loss in enumerate([1.0, 0.5, 0.25]):
                mlflow.log_metric("loss", loss, step=step)
            mlflow.log_artifact(str(report), artifact_path="validation")
    # MLflow's process-wide URIs are as they were (nothing leaks into other code in this process)
    assert {name: os.environ.get(name) for name in URI_ENV} == before
    assert mlflow.get_tracking_uri() != url
    client = mlflow.MlflowClient(tracking_uri=url)
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.info.experiment_id == exp_id
    assert got.data.params["model.profile"] == "tiny"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5, 0.25]
    # Artifacts went through the server (proxied), not to a client-side path.
    assert got.info.artifact_uri.startswith("mlflow-artifacts:")
    on_server = list((root / "artifacts").rglob("report.json"))
    assert len(on_server) == 1 and on_server[0].read_text() == report.read_text()
    back = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="validation/report.json",
                                               dst_path=str(tmp_path / "back"), tracking_uri=url)
    assert Path(back).read_text() == report.read_text()
