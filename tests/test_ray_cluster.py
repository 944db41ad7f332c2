"""faceid on a real 2-node Ray cluster that it did not start (issue 23), through the CLI and
``--ray-address``, with token authentication on (tests/ray_cluster.py starts it as users do).

In CI (``make test``): the cluster, prepare-pose with 2 workers (one per node) equal to one process,
the cluster unchanged after it, a missing token and an address where nothing listens in one line. The rest is ``make test-extended``
(``extended``): a wrong token; train-lora with 2 DDP workers equal to 1 worker with twice the batch;
a node lost mid-training (restarted: the run resumes; not back: a clear failure, then the rerun
resumes); batch-infer on the cluster equal to a local run.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

TRAIN_SETS = {"train_lora.stage1.steps": 6, "train_lora.stage2.steps": 6, "train_lora.checkpoint_every": 2,
              "train_lora.validation.validate_every": 4}
# 2 workers x batch b against 1 worker x batch 2b: the same samples, noise and timesteps per step
# (faceid.train.step.make_batch); only float summation order differs (the batch mean of 2b samples vs
# the mean of two means of b, DDP's gradient all-reduce). Measured: 4.8e-8 after 8 steps.
ADAPTER_ATOL = 1e-6


@pytest.fixture(scope="module")
def cluster():
    import ray_cluster

    c = ray_cluster.start()
    try:
        yield c
    finally:
        c.stop()


def faceid(cluster, repo: Path, args: list[str], sets: dict | None = None, env: dict | None = None, cwd: Path | None = None,
           timeout: float = 600, address: bool = True, wait: bool = True, log: Path | None = None):
    """``faceid <args> --ray-address <cluster>`` in its own process, with the cluster's token."""
    cmd = [sys.executable, "-m", "faceid.cli", "--params", str(repo / "params.yaml")]
    for key, value in (sets or {}).items():
        cmd += ["--set", f"{key}={value}"]
    cmd += args + (["--ray-address", cluster.address] if address else [])
    if not wait:
        return subprocess.Popen(cmd, env=env or cluster.env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return subprocess.run(cmd, env=env or cluster.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def said(stderr: str) -> list[str]:
    """The lines of ``stderr`` but progress bars (``3/3 [00:00<...]``)."""
    return [ln for ln in re.split(r"[\r\n]", stderr) if ln.strip() and not re.search(r"\d+/\d+ \[", ln)]


def node_ids(text: str) -> set[str]:
    """The node ids prepare-pose names in its log ("clips made on 2 Ray node(s): <id> (n), <id> (m)")."""
    line = next(ln for ln in text.splitlines() if "clips made on" in ln)
    return set(re.findall(r"([0-9a-f]{56}) \(\d+\)", line))


@pytest.fixture(scope="module")
def clips(tmp_path_factory, params, sample_dir) -> Path:
    """prepare-pose in one process (no Ray): the reference manifest, and the clips training uses."""
    from faceid.pose import prepare

    out = tmp_path_factory.mktemp("cluster_clips") / "clips"
    prepare.run(dataclasses.replace(params.prepare_pose, workers=1), sample_dir / "videos", None, out)
    return out


# --------------------------------------------------------------------------- CI


def test_prepare_pose_on_two_nodes_equals_one_process(cluster, clips, repo, sample_dir, tmp_path):
    """2 clip makers, one per node (each node has 1 CPU): both nodes make clips (their node ids in the
    log), the manifest is the single process's, and the cluster keeps its nodes, with no worker left."""
    from faceid.io import read_parquet

    out = tmp_path / "clips"
    done = faceid(cluster, repo, ["prepare-pose", "--videos", str(sample_dir / "videos"), "--output", str(out),
                                  "--workers", "2"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"on 2 Ray worker(s) at {cluster.address}" in done.stderr
    assert node_ids(done.stderr) == set(cluster.nodes.values()), done.stderr[-2000:]
    assert read_parquet(out / "manifest.parquet") == read_parquet(clips / "manifest.parquet")
    assert sorted(p.name for p in (out / "clips").iterdir()) == sorted(p.name for p in (clips / "clips").iterdir())
    assert "Traceback" not in done.stderr
    cluster.check_unchanged()


def test_a_missing_token_is_one_line(cluster, repo, sample_dir, tmp_path):
    """Token authentication on, no token anywhere (no RAY_AUTH_TOKEN(_PATH), no ~/.ray/auth_token):
    exit 2 and one line that says what is missing and how to give it; the output folder is not made."""
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.ray/auth_token there
    out = tmp_path / "clips"
    done = faceid(cluster, repo, ["prepare-pose", "--videos", str(sample_dir / "videos"), "--output", str(out),
                                  "--workers", "2"], env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert said(done.stderr) == [f"faceid prepare-pose: error: cannot join the Ray cluster at {cluster.address}: it requires token "
                     "authentication and no token was found; give faceid the cluster's token as its nodes have it: "
                     "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file> (default file "
                     "~/.ray/auth_token); docs/orchestration.md"], done.stderr[-3000:]
    assert not out.exists()
    cluster.check_unchanged()


# --------------------------------------------------------------------------- make test-extended


@pytest.mark.extended
def test_a_wrong_token_is_one_line(cluster, repo, sample_dir, tmp_path):
    """Another token than the cluster's (Ray retries the GCS for ~20 s first): one line, exit 2."""
    env = {**cluster.env, "RAY_AUTH_TOKEN": "0" * 64}
    env.pop("RAY_AUTH_TOKEN_PATH")
    done = faceid(cluster, repo, ["prepare-pose", "--videos", str(sample_dir / "videos"), "--output",
                                  str(tmp_path / "clips"), "--workers", "2"], env=env, cwd=tmp_path)
    assert done.returncode == 2
    lines = said(done.stderr)
    assert len(lines) == 1 and "it requires token authentication and this process's token is missing or not the " \
                               "cluster's" in lines[0], done.stderr[-3000:]
    cluster.check_unchanged()


def test_no_cluster_at_the_address_is_one_line(cluster, repo, sample_dir, tmp_path):
    """A port where nothing listens: one line at once, exit 2 (Ray's own client waits for minutes)."""
    from ray_cluster import free_port

    address = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "faceid.cli", "--params", str(repo / "params.yaml"), "prepare-pose", "--videos",
           str(sample_dir / "videos"), "--output", str(tmp_path / "clips"), "--workers", "2", "--ray-address", address]
    done = subprocess.run(cmd, env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = said(done.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"faceid prepare-pose: error: cannot join the Ray cluster at "
                                                   f"{address}: nothing answers there") and "cluster is up" in lines[0], lines


def train_args(sample_identity, clips: Path, out: Path) -> list[str]:
    crops, emb = sample_identity
    return ["train-lora", "--identity", "obama", "--crops", str(crops), "--embeddings", str(emb), "--clips", str(clips),
            "--output", str(out / "identity"), "--mlflow-uri", f"sqlite:///{out / 'mlflow.db'}"]


def train_sets(root: Path, out: Path, workers: int, batch: int) -> dict:
    return {**TRAIN_SETS, "train_lora.num_workers": workers, "train_lora.batch_size": batch,
            "train_lora.cache_dir": root / "cache", "ray.storage_path": out / "ray"}


@pytest.fixture(scope="module")
def trained(cluster, repo, sample_identity, clips, tmp_path_factory) -> dict[str, Path]:
    """train-lora on the cluster: 2 DDP workers x batch 1 ("two") and 1 worker x batch 2 ("one")."""
    root = tmp_path_factory.mktemp("cluster_train")
    runs = {}
    for name, workers, batch in (("two", 2, 1), ("one", 1, 2)):
        out = root / name
        done = faceid(cluster, repo, train_args(sample_identity, clips, out), train_sets(root, out, workers, batch), cwd=root)
        (root / f"{name}.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        cluster.check_unchanged()
        runs[name] = out
    runs["root"] = root
    return runs


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{name}:{k}": v for name in ("face_mapper", "pytorch_lora_weights")
            for k, v in load_file(str(folder / f"{name}.safetensors")).items()}


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= atol, f"adapters differ by up to {worst:.3g} (> {atol:g})"


@pytest.mark.extended
def test_two_ddp_workers_train_what_one_worker_with_twice_the_batch_trains(trained):
    """The same global batch (2 x 1 vs 1 x 2) and seed: the same loss curve (6 digits) and adapter
    within :data:`ADAPTER_ATOL`; both registered. Rank 0 alone validates (one row and one MLflow point
    per validation step, each printed once) and writes checkpoints (rank 0's files only)."""
    from mlflow.tracking import MlflowClient

    two, one = trained["two"], trained["one"]
    loss = "metrics/train_loss.csv"
    assert (two / "identity" / loss).read_text() == (one / "identity" / loss).read_text()
    assert_same_adapter(two / "identity", one / "identity", ADAPTER_ATOL)
    log = (trained["root"] / "two.log").read_text()
    assert "batch 1 x 2 worker(s)" in log
    val = (two / "identity" / "metrics" / "validation.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in val] == [0, 4, 8, 12]
    assert [ln for ln in log.splitlines() if ln.startswith("validation step ")] == \
        [ln for ln in (trained["root"] / "one.log").read_text().splitlines() if ln.startswith("validation step ")]
    assert len([ln for ln in log.splitlines() if ln.startswith("validation step ")]) == 4  # printed once, by rank 0
    for run in (two, one):
        uri = f"sqlite:///{run / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        mv = client.get_model_version_by_alias("faceid-obama", "candidate")
        series = client.get_metric_history(mv.run_id, "loss/val_identity")
        assert sorted(m.step for m in series) == [0, 4, 8, 12]
    [ray_run] = [p for p in (two / "ray").iterdir() if p.is_dir() and p.name.startswith("train-lora-")]
    checkpoints = sorted(p for p in ray_run.iterdir() if p.name.startswith("checkpoint_") and p.is_dir())
    assert checkpoints and all({p.name for p in c.iterdir()} <= {"trainable.safetensors", "optimizer.pt", "state.json",
                                                                 "best.safetensors", "identity"} for c in checkpoints)


def _wait_for_checkpoint(proc, out: Path, log: Path) -> None:
    deadline = time.monotonic() + 400
    while not list((out / "ray").glob("*/checkpoint_manager_snapshot.json")):  # a checkpoint registered
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 400 s"
        time.sleep(0.2)


@pytest.mark.extended
def test_a_node_lost_mid_training_resumes_to_the_uninterrupted_result(cluster, repo, sample_identity, clips, trained,
                                                                      tmp_path):
    """The second node's raylet killed after a checkpoint (its worker dies with it), the node started
    again as KubeRay would: Ray Train restarts the group from the checkpoint (FailureConfig) and the
    run ends with the uninterrupted 2-worker run's result."""
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = faceid(cluster, repo, train_args(sample_identity, clips, out), train_sets(trained["root"], out, 2, 1),
                  cwd=tmp_path, wait=False, log=log)
    try:
        _wait_for_checkpoint(proc, out, log)
        cluster.kill_node("node_b")
        cluster.start_node("node_b")
        assert proc.wait(timeout=500) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert re.search(r"resumed from step \d+", text), text[-3000:]
    loss = "metrics/train_loss.csv"
    assert (out / "identity" / loss).read_text() == (trained["two"] / "identity" / loss).read_text()
    assert_same_adapter(out / "identity", trained["two"] / "identity", 1e-7)
    cluster.check_unchanged()


@pytest.mark.extended
def test_a_group_the_cluster_cannot_place_fails_with_a_message_then_resumes(cluster, repo, sample_identity, clips,
                                                                             trained, tmp_path):
    """The second node lost after a checkpoint and not back: the 2-worker group cannot be placed; Ray
    Train's tries (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S each) end in faceid's one-line message, not a
    hang. With the node back, the same command resumes from the checkpoint to the uninterrupted result."""
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    env = {**cluster.env, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
    args, sets = train_args(sample_identity, clips, out), train_sets(trained["root"], out, 2, 1)
    proc = faceid(cluster, repo, args, sets, env=env, cwd=tmp_path, wait=False, log=log)
    try:
        _wait_for_checkpoint(proc, out, log)
        cluster.kill_node("node_b")
        t0 = time.monotonic()
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        if "node_b" not in cluster.nodes:
            cluster.start_node("node_b")
    text = log.read_text()
    assert rc == 2, text[-4000:]
    # Ray Train prints the lost group's error (the surviving rank's failed all-reduce) before it retries;
    # faceid's own process ends with its one line, no traceback of its own
    assert "faceid/cli.py" not in text and "faceid/train/launch.py" not in text, text[-4000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("faceid train-lora: error: train-lora obama: the Ray cluster could not place 2 training "
                           "worker(s) (1 CPU each; train_lora.num_workers) in 3 tries"), last
    assert f"the checkpoints in {out / 'ray'}" in last and "rerun the same command" in last
    assert time.monotonic() - t0 < 300
    assert not (out / "identity").exists()

    done = faceid(cluster, repo, args, sets, cwd=tmp_path)  # the node is back: the rerun resumes
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert re.search(r"resumed from step \d+", done.stdout + done.stderr)
    loss = "metrics/train_loss.csv"
    assert (out / "identity" / loss).read_text() == (trained["two"] / "identity" / loss).read_text()
    assert_same_adapter(out / "identity", trained["two"] / "identity", 1e-7)
    cluster.check_unchanged()


@pytest.mark.extended
def test_batch_infer_on_the_cluster_equals_local(cluster, repo, clips, trained, tmp_path):
    """batch-infer of the 2-worker identity on the prepare-pose clips: on the cluster and on a local
    Ray (no address, no token): the same manifest (but timings) and the same frames."""
    from faceid.io import read_parquet
    from faceid.pose.video import read_video

    identity = trained["two"] / "identity"
    runs = {}
    for name, address in (("cluster", True), ("local", False)):
        out = tmp_path / name
        env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")} if not address else None
        done = faceid(cluster, repo, ["batch-infer", "--identity", str(identity), "--pose-videos", str(clips),
                                      "--output", str(out), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                      {"ray.num_cpus": 2}, env=env, cwd=tmp_path, address=address)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        runs[name] = {r["key"]: r for r in read_parquet(out / "manifest.parquet")}
        if address:
            cluster.check_unchanged()
    assert runs["cluster"].keys() == runs["local"].keys() and runs["cluster"]
    differ = re.compile(r"_s$|seconds|^worker$|^output$")  # timings, the worker's host:pid, the output path
    for key, row in runs["cluster"].items():
        local = runs["local"][key]
        assert {k: v for k, v in row.items() if not differ.search(k)} == \
            {k: v for k, v in local.items() if not differ.search(k)}, key
        assert Path(row["output"]).name == Path(local["output"]).name
        if row["status"] == "ok":
            a = read_video(tmp_path / "cluster" / f"{key}.mp4")[0].astype(int)
            b = read_video(tmp_path / "local" / f"{key}.mp4")[0].astype(int)
            assert a.shape == b.shape and np.abs(a - b).max() <= 0, key
