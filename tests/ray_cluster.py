"""A real multi-node Ray cluster on this machine, started as users start one (test helper).

``ray start --head --node-ip-address 127.0.0.1 --port P --num-cpus 1`` and, for each other node,
``ray start --address 127.0.0.1:P --node-ip-address 127.0.0.1 --num-cpus 1``: separate processes,
each node with its own temp folder and a custom resource naming it (``node_a``, ``node_b``), token
authentication on (``RAY_AUTH_MODE=token`` and the cluster's own token in a file,
``RAY_AUTH_TOKEN_PATH``; :attr:`Cluster.env` gives a faceid command the same). Ray 2.60 maps
127.0.0.1 to the machine's own address (``services.resolve_ip_for_localhost``): the traffic stays on
this machine.

Only :meth:`Cluster.stop` stops it, and only its processes: every process of the cluster (GCS,
raylets, agents, workers of any job on it) carries :data:`MARK` in its environment (``ray start``
passes its environment to the daemons, the raylets to their workers). Never a plain ``ray stop``: it
stops every Ray on the machine, other people's test clusters included. Every port is a free one
(the dashboard's and the agents' defaults are fixed numbers that a second cluster would collide on).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

MARK = "FACEID_TEST_RAY_CLUSTER"
# Ray's own processes on a cluster, not any job's: idle workers the raylets keep for the next job, and
# Ray Data's named detached actors (one per cluster, ``get_if_exists=True``), made by the first Ray
# Data job and shared by every later one (ray/data/_internal: stats.py, usage/actor.py,
# cluster_autoscaler/, node_trackers/actor_location.py). faceid leaves them as it finds them:
# stopping them would break another user's Ray Data job on the same cluster.
RAY_OWN = ("ray::IDLE",)
RAY_DATA_SHARED = ("ray::_StatsActor", "ray::_AutoscalingCoordinatorActor", "ray::_UsageCollectionActor",
                   "ray::ActorLocationTracker")
RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE_BYTES = 300 * 2**20  # per node: tiny inputs; Ray's default (30 % of memory) twice over would be a lot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path  # short (Ray's unix sockets live under it): /tmp/frc-XXXX
    port: int
    mark: str
    token_file: Path
    nodes: dict[str, str] = field(default_factory=dict)  # name (its custom resource) -> Ray node id
    raylets: dict[str, int] = field(default_factory=dict)  # name -> raylet pid
    daemons: set[int] = field(default_factory=set)  # the nodes' own processes (not workers)
    dead: set[int] = field(default_factory=set)  # raylets killed (kill_node)
    dead_nodes: set[str] = field(default_factory=set)  # their node ids

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of a faceid command that joins this cluster (its token, not this machine's
        ``~/.ray/auth_token``); no cluster mark: the command is not part of the cluster."""
        env = {k: v for k, v in os.environ.items() if k not in (MARK, "RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file), RAY_USAGE_STATS_ENABLED="0")
        return env

    # ------------------------------------------------------------------ nodes

    def start_node(self, name: str, head: bool = False) -> None:
        """``ray start`` one node with 1 CPU and the resource ``name``; record its node id and pids."""
        args = [RAY, "start", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                "--resources", json.dumps({name: 1}), "--object-store-memory", str(OBJECT_STORE_BYTES),
                "--temp-dir", str(self.root / name), "--dashboard-agent-listen-port", str(free_port()),
                "--disable-usage-stats"]
        if head:
            args += ["--head", "--port", str(self.port), "--dashboard-port", str(free_port())]
        else:
            args += ["--address", self.address]
        env = {**self.env, MARK: self.mark}
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        raylet = next(p for p in self.processes() if _is_raylet(p) and str(self.root / name) in _cmd(p)
                      and p.pid not in self.dead)
        node_id = re.search(r"--node-id=([0-9a-f]+)", _cmd(raylet)).group(1)
        deadline = time.monotonic() + 60
        while self.alive_nodes().get(name) != node_id:
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {name} ({node_id}) did not join within 60 s: {self.alive_nodes()}")
            time.sleep(0.5)
        self.nodes[name], self.raylets[name] = node_id, raylet.pid
        self.daemons |= {p.pid for p in self.processes() if not _is_worker(p)}

    def kill_node(self, name: str) -> None:
        """SIGKILL the raylet of node ``name`` (its workers lose it and exit), as a machine that dies."""
        import psutil

        pid = self.raylets.pop(name)
        psutil.Process(pid).kill()
        self.dead.add(pid)
        self.dead_nodes.add(self.nodes.pop(name))

    def alive_nodes(self) -> dict[str, str]:
        """``{resource name: node id}`` of the nodes the GCS counts alive (but those killed), asked by a
        fresh driver."""
        code = ("import json, ray; ray.init(address=%r, log_to_driver=False, logging_level='ERROR');"
                "print(json.dumps([(next((k for k in n['Resources'] if k.startswith('node_')), '?'), n['NodeID']) "
                "for n in ray.nodes() if n['Alive']])); ray.shutdown()") % self.address
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"cannot list the cluster's nodes:\n{out.stderr[-2000:]}")
        return {name: node for name, node in json.loads(out.stdout.strip().splitlines()[-1])
                if node not in self.dead_nodes}  # a killed node counts alive until the GCS misses it (seconds)

    # ------------------------------------------------------------------ processes

    def processes(self) -> list:
        """Every process of the cluster (the mark in its environment)."""
        import psutil

        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(MARK) == self.mark and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found

    def workers(self) -> list[str]:
        """``"pid command"`` of the cluster's processes that are a job's: tasks, actors (ClipMaker, Ray
        Train's controller and workers...) -- not the nodes' own, not :data:`RAY_OWN` or
        :data:`RAY_DATA_SHARED`."""
        out = []
        for proc in self.processes():
            if proc.pid not in self.daemons:
                with contextlib.suppress(Exception):
                    cmd = _cmd(proc).strip()
                    if cmd not in RAY_OWN + RAY_DATA_SHARED:
                        out.append(f"{proc.pid} {cmd[:120]}")
        return out

    def shared(self) -> list[str]:
        """The :data:`RAY_DATA_SHARED` actors running now (each at most once: shared, not per job)."""
        names = []
        for proc in self.processes():
            with contextlib.suppress(Exception):
                if _cmd(proc).strip() in RAY_DATA_SHARED:
                    names.append(_cmd(proc).strip())
        return sorted(names)

    def check_unchanged(self, timeout: float = 30.0) -> None:
        """The cluster is up with the same nodes, and no worker of a finished command is left on it
        (Ray ends a job's workers when its driver disconnects: waited for up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.workers() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not self.workers(), f"processes of a finished command still on the cluster: {self.workers()}"
        shared = self.shared()
        assert len(shared) == len(set(shared)), f"Ray Data's shared actors made again by a later job: {shared}"
        assert self.alive_nodes() == self.nodes, f"the cluster's nodes changed: {self.alive_nodes()} != {self.nodes}"
        for name, pid in self.raylets.items():
            assert any(p.pid == pid for p in self.processes()), f"the raylet of {name} (pid {pid}) is gone"

    def stop(self) -> None:
        """Stop this cluster's processes (SIGTERM, then SIGKILL), nothing else; remove its folder."""
        from faceid.ray_session import stop_processes

        for _ in range(3):  # a raylet still alive may start a worker while the others stop
            procs = self.processes()
            if not procs:
                break
            stop_processes(procs)
        shutil.rmtree(self.root, ignore_errors=True)


def start(names: tuple[str, ...] = ("node_a", "node_b")) -> Cluster:
    """A cluster of ``len(names)`` nodes of 1 CPU each, the first the head; stopped if it fails to start."""
    root = Path(tempfile.mkdtemp(prefix="frc-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    cluster = Cluster(root=root, port=free_port(), mark=uuid.uuid4().hex, token_file=token)
    try:
        for i, name in enumerate(names):
            cluster.start_node(name, head=i == 0)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _cmd(proc) -> str:
    return " ".join(proc.cmdline())


def _is_raylet(proc) -> bool:
    with contextlib.suppress(Exception):
        return Path(proc.cmdline()[0]).name == "raylet"
    return False


def _is_worker(proc) -> bool:
    """A worker process of a job (``ray::<task or actor>``, ``ray::IDLE``, default_worker.py); not the
    node's agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``)."""
    with contextlib.suppress(Exception):
        cmd = _cmd(proc)
        if cmd.startswith("ray::"):
            return not cmd.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent"))
        return any(Path(arg).name == "default_worker.py" for arg in proc.cmdline()[:3])
    return False
