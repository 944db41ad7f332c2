"""Ray for prepare-pose, train-lora and batch-infer: the one place that starts, joins and stops it.

:func:`session` is the only caller of ``ray.init`` / ``ray.shutdown`` in faceid:

- Ray already initialised in this process (tests, notebooks): used as is and left running.
- ``address`` given (``auto``, ``ray://head:10001``): joined for the block, disconnected after.
- otherwise a new local Ray (``address="local"``: never another user's cluster on this machine) on
  ``num_cpus`` cores (0 = all), stopped after the block -- and never outliving this process, even
  when it is killed (SIGKILL, the OOM killer). Ray alone leaves its DashboardAgent and
  RuntimeEnvAgent running when its driver dies (measured with Ray 2.60: still there 30 s later),
  and workers too when the driver dies during start-up. So before ``ray.init`` the driver starts a
  watchdog, ``python -m faceid.ray_session <driver pid> <token>`` in its own session, that holds a pipe
  from the driver: when the driver exits for any reason the pipe closes and the watchdog stops every
  process of that Ray session (SIGTERM, then SIGKILL after :data:`GRACE_S`), then exits.

Which processes belong to the session: processes whose environment holds this session's token
(:data:`TOKEN_ENV`, set while ``ray.init`` starts the head processes, so the raylet and the workers
it starts inherit it); processes whose raylet (``RAY_RAYLET_PID`` in their environment, e.g. Ray's
agents) is one of those; and, when the driver died, its descendants born after the watchdog (noted
every :data:`POLL_S` seconds). Nothing else is touched: another Ray on the same machine has neither
the token nor our raylet, and the driver's older children are not noted.

Ray's own log records are kept at ERROR on the terminal (``ray.LoggingConfig`` for the job; Ray
Train's ``RunConfig(logging_config=...)`` in ``faceid.train.launch``): on a loaded machine Ray
Train's controller otherwise prints a traceback ("Failed to send resource request") on a run that
succeeds. They stay in the session's log folder (``/tmp/ray/session_*/logs``). Ray Train runs with
:data:`RAY_TRAIN_OUTPUT_ENV` (each worker ``print`` shown once, no per-report INFO lines) and, on a
local Ray, :data:`RAY_TRAIN_LOCAL_ENV` (:func:`train_env`): no warnings that only a cluster's
features would explain (state API, preemption).

Joining a cluster (docs/orchestration.md): Ray reads the cluster's token from this process's
environment (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token``); a refused or missing token, or no cluster at the address, is one line
(:func:`join_error`), not Ray's traceback. faceid never stops a cluster it joined: it disconnects.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping

from faceid.errors import FaceidError
from faceid.io import environ_set

TOKEN_ENV = "FACEID_RAY_SESSION"
POLL_S = 0.25  # how often the watchdog notes the driver's descendants
GRACE_S = 5.0  # SIGTERM -> SIGKILL
RAY_LOG_LEVEL = "ERROR"  # Ray's own log records on the terminal
REACH_TIMEOUT_S = 10.0  # a cluster address must accept a TCP connection within this
GOODBYE = b"done\n"  # the driver's last words on the pipe: a normal exit (the watchdog stays quiet)

# Ray Train's own switches (environment variables it passes from the driver to its controller and
# workers), for a run on a local Ray; one already set in the environment is left as it is.
RAY_TRAIN_LOCAL_ENV = {
    # Its state actor asks Ray's state API every 30 s whether the run's controller is alive; a local
    # Ray has no dashboard to answer, so each poll logged "State API unavailable when checking if
    # actor is alive" with a traceback.
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    # Nothing preempts one machine; the watcher's actor made core_worker log an error line on every
    # run ("Actor with class name: 'PreemptionWatcher' ... has constructor arguments in the object store").
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
# ... and on a cluster too: what the terminal shows (the same on a cluster: measured with Ray 2.60)
RAY_TRAIN_OUTPUT_ENV = {
    # Ray Train patches the workers' print to log each line too: the driver showed every line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray Train's worker logging puts the workers' root logger at INFO ("Reporting training result 1:
    # TrainingReport(...)" per report and rank); without it they keep the job's RAY_LOG_LEVEL.
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
}


def resolve_address(explicit: str | None, cfg, environ: Mapping[str, str]) -> str:
    """The Ray address of a run: ``explicit`` (a flag, a pipeline parameter) > ``$RAY_ADDRESS`` >
    ``ray.address`` (``cfg``, params.yaml) > "" (a local Ray). The doors pass their environment."""
    return explicit or environ.get("RAY_ADDRESS") or cfg.address


@contextlib.contextmanager
def session(address: str = "", num_cpus: int = 0, log_to_driver: bool = False) -> Iterator[None]:
    """Ray for the block: the one already initialised, the cluster at ``address``, or a new local
    Ray that cannot outlive this process (see the module docstring)."""
    import ray

    if ray.is_initialized():
        with _ray_data_quiet():
            yield
        return
    logging_config = ray.LoggingConfig(log_level=RAY_LOG_LEVEL)
    if address:
        _check_reachable(address)  # Ray itself waits minutes on an address where nothing listens
        with _driver_logging_kept(), _sigterm_handler_kept():
            try:
                with _native_stderr_held():  # Ray's C++ client logs a warning per retry (20 in 20 s)
                    ray.init(address=address, log_to_driver=log_to_driver, logging_config=logging_config)
            except Exception as exc:  # Ray's own message is a traceback of its retries: one line instead
                raise FaceidError(join_error(address, exc)) from None
        try:
            with _ray_data_quiet():
                yield
        finally:
            ray.shutdown()
        return
    token = uuid.uuid4().hex
    watchdog = start_watchdog(token)
    try:
        with environ_set(TOKEN_ENV, token), _driver_logging_kept(), _sigterm_handler_kept():
            ray.init(address="local", num_cpus=num_cpus or None, include_dashboard=False,
                     log_to_driver=log_to_driver, logging_config=logging_config)
        try:
            with _ray_data_quiet():
                yield
        finally:
            ray.shutdown()
    finally:
        stop_watchdog(watchdog)


def _check_reachable(address: str) -> None:
    """A ``host:port`` address (the GCS of ``ray start --head``) where nothing accepts a connection
    within :data:`REACH_TIMEOUT_S`: one line at once (Ray's own client retries for minutes). Other
    forms (``auto``, ``ray://``) are left to Ray."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        raise FaceidError(f"cannot join the Ray cluster at {address}: nothing answers there ({exc.strerror or exc}); "
                          "check the address (--ray-address, $RAY_ADDRESS or ray.address) and that the cluster is up") from None


def join_error(address: str, exc: BaseException) -> str:
    """What went wrong joining the cluster at ``address``, in one line: a token the cluster refuses
    (or none), no cluster there, or Ray's own last line."""
    texts, seen = [], exc
    while seen is not None:  # ray.init wraps the GCS client's error (as text) in a ConnectionError
        texts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(texts)
    if "AuthenticationError" in text or "InvalidAuthToken" in text:
        why = ("no token was found" if "no authentication token was found" in text
               else "this process's token is missing or not the cluster's")
        return (f"cannot join the Ray cluster at {address}: it requires token authentication and {why}; give "
                f"faceid the cluster's token as its nodes have it: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> "
                f"or RAY_AUTH_TOKEN_PATH=<file> (default file ~/.ray/auth_token); docs/orchestration.md")
    last = next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), type(exc).__name__)
    return (f"cannot join the Ray cluster at {address} ({type(exc).__name__}: {last[:300]}); check the address "
            f"(--ray-address, $RAY_ADDRESS or ray.address) and that the cluster is up")


@contextlib.contextmanager
def _native_stderr_held() -> Iterator[None]:
    """File descriptor 2 (where Ray's C++ core writes its log lines, beyond Python's logging) goes
    to a temporary file for the block, written back to stderr after it, unless the block raised:
    a failed join shows faceid's one line, not Ray's "Failed to get cluster ID from GCS server" per
    retry. Nothing is held when fd 2 cannot be duplicated."""
    import tempfile

    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    raised = True
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            raised = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not raised:
                held.seek(0)
                data = held.read()
                while data:
                    data = data[os.write(2, data):]


@contextlib.contextmanager
def train_env(address: str) -> Iterator[None]:
    """For the block (around ``trainer.fit()``, when Ray Train reads them): :data:`RAY_TRAIN_OUTPUT_ENV`,
    and :data:`RAY_TRAIN_LOCAL_ENV` where ``address`` is "" (a local Ray: a cluster keeps Ray Train's
    state reconciliation and preemption watcher), except the variables the environment already sets."""
    switches = {**RAY_TRAIN_OUTPUT_ENV, **({} if address else RAY_TRAIN_LOCAL_ENV)}
    with contextlib.ExitStack() as stack:
        for name, value in switches.items():
            stack.enter_context(environ_set(name, value, keep_existing=True))
        yield


def start_watchdog(token: str) -> subprocess.Popen:
    """The watchdog of this driver's local Ray session (its own session: a Ctrl-C or a kill of the
    driver's process group does not reach it)."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    return subprocess.Popen([sys.executable, "-m", "faceid.ray_session", str(os.getpid()), token],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, start_new_session=True)


def stop_watchdog(watchdog: subprocess.Popen) -> None:
    """Say goodbye and close the pipe: the watchdog stops what is left of the session (normally
    nothing) quietly and exits."""
    with contextlib.suppress(OSError):
        watchdog.stdin.write(GOODBYE)
    with contextlib.suppress(OSError):
        watchdog.stdin.close()
    try:
        watchdog.wait(timeout=GRACE_S + 10)
    except subprocess.TimeoutExpired:  # it goes on alone; it exits when done
        pass


@contextlib.contextmanager
def _driver_logging_kept() -> Iterator[None]:
    """``ray.init(logging_config=...)`` also reconfigures this process's root logger: restore it."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


def fit_off_main_thread(fit):
    """``fit()`` (Ray Train's ``trainer.fit``) in a helper thread while the main thread waits for it.
    On the main thread Ray Train installs its own SIGINT handler for the rest of the process: Ctrl-C
    then aborts the run and the process exits 1 without a word. Off the main thread it installs none
    (as under Ray Tune), so Ctrl-C and SIGTERM reach faceid's entry point as usual: the main thread
    raises, :func:`session` stops the local Ray (and with it the run), the CLI says how to resume."""
    import threading

    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="faceid-ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # short waits: a signal handler runs between them
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@contextlib.contextmanager
def _sigterm_handler_kept() -> Iterator[None]:
    """``ray.init`` replaces the process's SIGTERM handler twice: with Python's ``sys.exit(15)``, then
    (its C++ core worker) with a failure handler that prints a native stack and aborts: exit 134
    instead of faceid's clean stop (``faceid.cli.main``: finally blocks run, exit 143). Put back the
    handler the process had before (only the main thread may set one)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not installed from Python (left as Ray set it)
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _ray_data_quiet() -> Iterator[None]:
    """For the block: Ray Data's driver-side records (progress-bar notice, "execution finished")
    at :data:`RAY_LOG_LEVEL` on the terminal, and its own progress bars off (faceid shows one bar
    per stage); both restored after, so a caller's Ray Data settings are left as they were."""
    import logging

    from ray.data import DataContext

    data = logging.getLogger("ray.data")
    level = data.level
    context = DataContext.get_current()
    bars = context.enable_progress_bars
    data.setLevel(RAY_LOG_LEVEL)
    context.enable_progress_bars = False
    try:
        yield
    finally:
        data.setLevel(level)
        context.enable_progress_bars = bars


# --------------------------------------------------------------------------- the watchdog process


def session_processes(known: dict, token: str) -> list:
    """``psutil.Process`` objects of the session: the ``known`` descendants (pid -> create time,
    checked against pid reuse), processes with the token, and those whose raylet is one of them."""
    import psutil

    found = {}
    for pid, created in known.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                found[pid] = proc
    envs = {}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            envs[proc.pid] = (proc, proc.environ())
    for pid, (proc, env) in envs.items():
        if env.get(TOKEN_ENV) == token:
            found[pid] = proc
    raylets = {str(pid) for pid in found}
    for pid, (proc, env) in envs.items():
        if env.get("RAY_RAYLET_PID") in raylets:
            found[pid] = proc
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_processes(procs: list) -> int:
    """SIGTERM, wait up to :data:`GRACE_S`, SIGKILL what is left. Returns how many were running."""
    import psutil

    def gone(proc) -> bool:  # exited; a zombie waits for its parent to reap it, which may be the caller
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def wait(alive: list) -> list:
        deadline = time.monotonic() + GRACE_S
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [proc for proc in alive if not gone(proc)]
        return alive

    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
            alive.append(proc)
    for proc in wait(alive):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(procs)


def watch(driver_pid: int, token: str) -> tuple[int, bool]:
    """Note the driver's descendants until the pipe on stdin closes (the driver exited), then stop
    every process of the session. Returns how many were still running and whether the driver said
    goodbye (a normal exit) before the pipe closed."""
    import select

    import psutil

    known: dict[int, float] = {}
    born = psutil.Process().create_time()  # the driver's children from before the session are not ours
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        driver = None
    fd, said = sys.stdin.fileno(), b""
    while True:
        readable, _, _ = select.select([fd], [], [], POLL_S)
        if readable:
            data = os.read(fd, 4096)
            if not data:
                break  # EOF: the driver closed the pipe or died
            said += data
        if driver is not None:
            with contextlib.suppress(psutil.Error):
                for child in driver.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if child.pid not in known and child.create_time() >= born:
                            known[child.pid] = child.create_time()
    normal_exit = GOODBYE in said
    if normal_exit:  # after ray.shutdown(): only what carries the session's marks, never other children
        known = {}
    stopped: set[int] = set()
    for _ in range(3):  # a raylet still alive may start a worker while we stop the others
        procs = [proc for proc in session_processes(known, token) if proc.pid not in stopped]
        if not procs:
            break
        stop_processes(procs)
        stopped |= {proc.pid for proc in procs}
    return len(stopped), normal_exit


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    driver_pid, token = int(argv[0]), argv[1]
    stopped, normal_exit = watch(driver_pid, token)
    if stopped and not normal_exit:
        print(f"faceid: stopped {stopped} process(es) of the local Ray session of pid {driver_pid}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
