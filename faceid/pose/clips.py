"""prepare-pose's clip makers: one clip = decode (1), pose model (2), crop / draw / face regions (3),
write its four files (4); in this process, in worker processes on this machine, or on Ray Data.

A :class:`ClipMaker` builds the pose model and face detector once. :meth:`ClipMaker.make_one` makes
a clip with steps 1-4 in turn; local worker processes (:func:`make_in_processes`, the default on a
machine of 2 cores) each make one clip at a time that way, so that no other Python thread competes
with a pose model for the GIL (mediapipe hands it back and forth on every frame: a busy thread beside
it slows it down by half or more on shared cores), and the operating system overlaps one worker's
pose model with another's decoding and encoding. :meth:`ClipMaker.make_all` (``workers: 1``, and
each Ray actor) overlaps consecutive clips in threads instead: the pose model runs back to back in
one thread, a thread plans (when the jobs come lazily) and decodes the next clip, a thread finishes
the previous one, whose two videos are encoded by two more threads at once; the models are built
while the first clip decodes. Every path runs the same functions on the same frames: the files are
the same bytes (tests/test_pose_prepare.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceid.config import PreparePoseConfig
from faceid.errors import FaceidError
from faceid.io import atomic_dir, progress
from faceid.pose.face_regions import FACE_DETECTOR, FACE_MIN_CONFIDENCE, face_regions, face_sample_frames
from faceid.pose.geometry import DRAW_MIN_CONFIDENCE, apply_crop, crop_box, transform_keypoints
from faceid.pose.inputs import VideoPlan, clip_checksum

CLIP_FILES = ("video.mp4", "pose.mp4", "keypoints.npz", "faces.npz")
MAX_CLIPS_PER_CALL = 4  # clips a Ray worker takes at a time (its decode / pose / encode overlap within them)
ENCODE_PRESET = "veryfast"  # x264: half the CPU of "fast" at crf 18 (41.3 vs 42.5 dB PSNR on a 480x832 clip)
LOCAL_RAY_MIN_CLIPS = 8  # workers 0 on one machine: fewer clips to make are made in this process
LOCAL_RAY_MIN_CORES = 2  # ... and so is everything on a machine with this many cores or fewer


@dataclass
class ClipJob:
    """One clip to make: everything a worker needs (plain values: it travels to Ray workers as JSON)."""

    clip_id: str
    video: str
    pose: str | None
    video_indices: list[int]  # source frames of the clip
    pose_indices: list[int] | None
    size: tuple[int, int] | None  # decode size (h, w) of both videos; None = native
    checksum: str

    @classmethod
    def of(cls, plan: VideoPlan, start: int, num_frames: int) -> "ClipJob":
        stop = start + num_frames
        return cls(
            clip_id=f"{plan.video.stem}-{start:05d}", video=str(plan.video), pose=str(plan.pose) if plan.pose else None,
            video_indices=[int(i) for i in plan.video_indices[start:stop]],
            pose_indices=None if plan.pose_indices is None else [int(i) for i in plan.pose_indices[start:stop]],
            size=None if plan.size is None else (int(plan.size[0]), int(plan.size[1])),
            checksum=clip_checksum(plan.key, start),
        )


def done_clip(clip_dir: Path, checksum: str) -> tuple[np.ndarray, int] | None:
    """``(detected flags, number of face regions)`` of a finished clip with this checksum, else None."""
    if not all((clip_dir / n).is_file() for n in CLIP_FILES):
        return None
    try:
        with np.load(clip_dir / "keypoints.npz", allow_pickle=False) as kz, \
                np.load(clip_dir / "faces.npz", allow_pickle=False) as fz:
            if str(kz["checksum"]) != checksum or str(fz["checksum"]) != checksum:
                return None
            return kz["detected"], int(len(fz["frames"]))
    except Exception:
        return None


@dataclass
class Decoded:
    """A clip's source frames: at analysis resolution, the pose video's, and the face samples at native size."""

    frames: np.ndarray
    pose_frames: np.ndarray | None
    face_frames: np.ndarray
    face_picks: np.ndarray


def decode_clip(cfg: PreparePoseConfig, job: ClipJob) -> Decoded:
    """1. Decode the clip's frames (analysis resolution), its pose video's, and the face-sample frames
    at the source's native resolution (the same source frames; taken from the clip's frames when the
    analysis resolution is the native one)."""
    from faceid.pose.video import read_frames

    frames = read_frames(job.video, job.video_indices, job.size)
    pose_frames = read_frames(job.pose, job.pose_indices, frames.shape[1:3]) if job.pose is not None else None
    picks = face_sample_frames(cfg.num_frames, cfg.face_samples)
    if not len(picks):
        native = np.zeros((0, 1, 1, 3), np.uint8)
    elif job.size is None:
        native = frames[picks]
    else:
        native = read_frames(job.video, [job.video_indices[i] for i in picks])
    return Decoded(frames, pose_frames, native, picks)


def _crop(frames: np.ndarray, box: tuple[int, int, int, int], out_h: int, out_w: int) -> np.ndarray:
    """:func:`apply_crop`, without its copy when the window is the whole frame at the clip's size
    (cv2.resize to the same size copies the pixels unchanged)."""
    if tuple(box) == (0, 0, out_w, out_h) and frames.shape[1:3] == (out_h, out_w):
        return frames
    return apply_crop(frames, box, out_h, out_w)


def _write_target(cfg: PreparePoseConfig, path: Path, frames: np.ndarray, box) -> None:
    from faceid.pose.video import write_video

    write_video(path, _crop(frames, box, cfg.height, cfg.width), cfg.fps, preset=ENCODE_PRESET)


def _write_pose(cfg: PreparePoseConfig, path: Path, pose_frames: np.ndarray | None, box, clip_kps: np.ndarray) -> None:
    """The given pose video cropped like the clip, or the skeleton drawn at the clip's size."""
    from faceid.pose.draw import draw_poses
    from faceid.pose.video import write_video

    if pose_frames is not None:
        pose = _crop(pose_frames, box, cfg.height, cfg.width)
    else:
        pose = draw_poses(clip_kps, cfg.height, cfg.width, DRAW_MIN_CONFIDENCE)
    write_video(path, pose, cfg.fps, preset=ENCODE_PRESET)


def finish_clip(cfg: PreparePoseConfig, decoded: Decoded, kps: np.ndarray, detector, clip_dir: Path, checksum: str,
                encoder: Executor | None = None) -> dict:
    """3-4. With the person's keypoints (step 2: the pose model on ``decoded.frames``): crop both
    videos with one window, draw the skeleton (unless a pose video was given), cut the face regions,
    and write all four files or none. ``encoder``: threads that encode the two videos at once (None:
    in this thread, one after the other; the same bytes). ``detector`` may be None when
    ``face_samples`` is 0. Returns the clip's outcome without its ``clip_id``."""
    detected = (kps[..., 2] > 0).any(axis=1)
    h, w = decoded.frames.shape[1:3]
    box = crop_box(h, w, cfg.height, cfg.width, kps if cfg.person_aware_crop else None)
    clip_kps = transform_keypoints(kps, box, cfg.height, cfg.width)
    with atomic_dir(clip_dir) as tmp:
        videos = [(_write_target, tmp / "video.mp4", decoded.frames, box),
                  (_write_pose, tmp / "pose.mp4", decoded.pose_frames, box, clip_kps)]
        if encoder is None:
            for fn, *args in videos:
                fn(cfg, *args)
            faces = face_regions(decoded.face_frames, decoded.face_picks, detector)
        else:
            futures = [encoder.submit(fn, cfg, *args) for fn, *args in videos]
            try:
                faces = face_regions(decoded.face_frames, decoded.face_picks, detector)
            finally:  # both encodes end before the folder is kept (or removed)
                for future in futures:
                    future.exception()
            for future in futures:
                future.result()
        np.savez(tmp / "keypoints.npz", keypoints=clip_kps, detected=detected, checksum=np.array(checksum))
        np.savez(tmp / "faces.npz", **faces, checksum=np.array(checksum))
    return {"detected": [bool(d) for d in detected], "num_face_regions": int(len(faces["frames"]))}


class ClipMaker:
    """One worker's clip maker (in this process, or one per Ray Data actor).

    The pose estimator and the face detector are built once (while the first clip decodes) and
    reused for every clip. :meth:`make_all` overlaps the steps of consecutive clips in threads (the
    module's docstring); at most three clips are in memory. Each clip's outcome is a dict:
    ``clip_id``, ``detected`` (list of bools) and ``num_face_regions``, or ``error``; one failing
    clip never stops the others.
    """

    def __init__(self, cfg: PreparePoseConfig, staging: str | Path):
        self.cfg, self.staging = cfg, Path(staging)
        self.estimator = self.detector = None

    def build(self) -> None:
        """Build the pose estimator and the face detector (once)."""
        from faceid.faces.detect import build_detector
        from faceid.pose.estimate import build_estimator

        if self.estimator is None:
            self.estimator = build_estimator(self.cfg)
            if self.cfg.face_samples > 0:
                self.detector = build_detector(FACE_DETECTOR, FACE_MIN_CONFIDENCE)

    def make_one(self, job: ClipJob) -> dict:
        """One clip, steps 1-4 in turn in this thread: the reference :meth:`make_all` keeps to."""
        self.build()
        try:
            decoded = decode_clip(self.cfg, job)
            kps = self.estimator.estimate(decoded.frames)
            return {"clip_id": job.clip_id, **finish_clip(self.cfg, decoded, kps, self.detector,
                                                           self.staging / job.clip_id, job.checksum)}
        except Exception as exc:
            return _failed(job, exc)

    def make_all(self, jobs: Iterable[ClipJob]) -> Iterator[dict]:
        """Outcomes in the order of ``jobs`` (a list, or an iterator that plans them as it goes:
        it is advanced in the decode thread)."""
        jobs = iter(jobs)
        job = next(jobs, None)
        if job is None:
            return

        def decode(job):
            try:
                return job, decode_clip(self.cfg, job), None
            except Exception as exc:
                return job, None, exc

        def take():  # the next job and its frames, or None
            job = next(jobs, None)
            return None if job is None else decode(job)

        with ThreadPoolExecutor(1, thread_name_prefix="decode") as decoder, \
                ThreadPoolExecutor(1, thread_name_prefix="finish") as finisher, \
                ThreadPoolExecutor(2, thread_name_prefix="encode") as encoder:
            decoding = decoder.submit(decode, job)
            self.build()  # while the first clip decodes
            finishing = None  # (job, future) of the previous clip
            while (taken := decoding.result()) is not None:
                job, decoded, failed = taken
                decoding = decoder.submit(take)
                started = None
                if failed is None:
                    try:
                        kps = self.estimator.estimate(decoded.frames)
                        started = (job, finisher.submit(finish_clip, self.cfg, decoded, kps, self.detector,
                                                        self.staging / job.clip_id, job.checksum, encoder))
                    except Exception as exc:
                        failed = exc
                del decoded
                if finishing is not None:
                    yield _outcome(*finishing)
                finishing = started
                if failed is not None:
                    yield _failed(job, failed)
            if finishing is not None:
                yield _outcome(*finishing)

    def __call__(self, batch: dict) -> dict:
        """Ray Data: a batch of JSON jobs -> their JSON outcomes."""
        jobs = [ClipJob(**json.loads(text)) for text in batch["job"]]
        for path in [Path(jobs[0].video), self.staging] if jobs else []:
            if not path.exists():  # a cluster node without the driver's storage: every clip would fail
                import socket

                raise FaceidError(
                    f"prepare-pose: the Ray worker on {socket.gethostname()} cannot see {path}; on a cluster the "
                    "videos and the output folder must be on storage that every Ray node mounts at the same path")
        import ray

        node = ray.get_runtime_context().get_node_id()  # which node made them (the run's log names them)
        return {"outcome": np.array([json.dumps({**o, "node": node}) for o in self.make_all(jobs)], dtype=object)}

    def close(self) -> None:
        if self.estimator is not None:
            self.estimator.close()
        if self.detector is not None:
            self.detector.close()


def _failed(job: ClipJob, exc: Exception) -> dict:
    return {"clip_id": job.clip_id, "error": f"failed: {type(exc).__name__}: {exc}"}


def _outcome(job: ClipJob, future) -> dict:
    try:
        return {"clip_id": job.clip_id, **future.result()}
    except Exception as exc:
        return _failed(job, exc)


def where_to_make(cfg: PreparePoseConfig, ray_address: str = "", num_cpus: int = 0, count: int | None = None,
                  videos: int | None = None) -> str | None:
    """Where :func:`make_clips` makes ``count`` clips (from ``videos`` videos): ``"here"`` (this
    process), ``"processes"`` (worker processes on this machine) or ``"ray"``; None when that depends
    on how many clips there are and ``count`` is not known yet."""
    if cfg.workers == 1:
        return "here"
    if ray_address or cfg.workers >= 2:
        return "ray"
    cores = num_cpus or os.cpu_count() or 1
    if cores <= LOCAL_RAY_MIN_CORES:
        many = count if count is not None else videos
        if many is None:
            return None
        return "processes" if cores >= 2 and many >= 2 else "here"
    if count is None:
        return None
    return "ray" if count >= LOCAL_RAY_MIN_CLIPS else "processes" if count >= 2 else "here"


def make_clips(cfg: PreparePoseConfig, jobs: Iterable[ClipJob], staging: Path, ray_address: str = "",
               num_cpus: int = 0, videos: int | None = None) -> Iterator[dict]:
    """Make ``jobs`` into ``staging``; yield each outcome as it arrives (any order), with progress.

    Where (:func:`where_to_make`): ``cfg.workers`` 1 -> in this process (:meth:`ClipMaker.make_all`).
    A cluster (``ray_address``) or ``cfg.workers`` >= 2 -> on Ray Data: that many actors (0 = one per
    CPU of the cluster), each a :class:`ClipMaker`. ``cfg.workers`` 0 without a cluster -> local Ray
    on ``num_cpus`` cores (0 = all) when there are at least :data:`LOCAL_RAY_MIN_CLIPS` clips to make
    and more than :data:`LOCAL_RAY_MIN_CORES` cores; else one worker process per core (at most one
    per clip; :func:`make_in_processes`), or this process for a single clip (or video, when ``jobs``
    is lazy and ``videos`` says how many) or core. ``jobs`` may be an iterator that plans them as it
    goes (the first clip starts before the last video is probed) except on Ray, which reads it
    whole first. On a cluster ``staging`` must be on storage that every node sees (as
    ``ray.storage_path`` for training).
    """
    where = where_to_make(cfg, ray_address, num_cpus, len(jobs) if isinstance(jobs, list) else None, videos)
    if where in (None, "ray"):
        jobs = list(jobs)
        where = where_to_make(cfg, ray_address, num_cpus, len(jobs))
        if not jobs:
            return
    total = len(jobs) if isinstance(jobs, list) else None
    if where == "here":
        maker = ClipMaker(cfg, staging)
        try:
            yield from progress(maker.make_all(jobs), total=total, desc="prepare-pose")
        finally:
            maker.close()
    elif where == "processes":
        processes = min(num_cpus or os.cpu_count() or 1, total or videos or 2)
        yield from progress(make_in_processes(cfg, jobs, staging, processes), total=total, desc="prepare-pose")
    else:
        yield from _make_on_ray(cfg, jobs, staging, ray_address, num_cpus)


def make_in_processes(cfg: PreparePoseConfig, jobs: Iterable[ClipJob], staging: Path, processes: int) -> Iterator[dict]:
    """Make ``jobs`` in ``processes`` worker processes on this machine (each runs :func:`worker`);
    outcomes as they finish. Each worker has one :class:`ClipMaker` and makes
    one clip at a time (:meth:`ClipMaker.make_one`): no other Python thread competes with its pose
    model for the GIL, and the operating system overlaps one worker's pose model with another's
    decoding and encoding. ``jobs`` is read as workers ask for clips (it may plan them as it goes).
    A worker that cannot build its models (a configuration error) fails the run with that error; a
    worker that dies fails it, keeping the clips made (a rerun resumes)."""
    import itertools
    import queue
    import subprocess
    import threading

    import faceid
    from faceid.config import to_dict

    jobs = iter(jobs)
    first = next(jobs, None)
    if first is None:  # nothing to make (a rerun): no worker started
        return
    jobs = itertools.chain([first], jobs)
    lock, results = threading.Lock(), queue.Queue()
    home = str(Path(faceid.__file__).resolve().parents[1])  # the workers import this faceid, whatever the cwd
    command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {home!r}); import {__name__} as m; m.{worker.__name__}()"]
    workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
               for _ in range(processes)]

    def feed(proc: subprocess.Popen) -> None:  # one thread per worker: a clip to it, its outcome back
        try:
            proc.stdin.write(json.dumps({"cfg": to_dict(cfg), "staging": str(staging)}) + "\n")
            while True:
                with lock:
                    job = next(jobs, None)
                if job is None:
                    break
                proc.stdin.write(json.dumps(dataclasses.asdict(job)) + "\n")
                line = proc.stdout.readline()
                if not line:
                    raise FaceidError(f"prepare-pose: a worker process died (exit code {proc.wait()}) while making "
                                      f"{job.clip_id}; clips made so far are kept and a rerun resumes")
                answer = json.loads(line)
                if "fatal" in answer:
                    raise FaceidError(answer["fatal"])
                results.put(answer)
        except OSError:  # a broken pipe: the worker is gone
            results.put(FaceidError(f"prepare-pose: a worker process died (exit code {proc.wait()}); clips made "
                                    "so far are kept and a rerun resumes"))
        except BaseException as exc:
            results.put(exc)
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
            results.put(None)

    threads = [threading.Thread(target=feed, args=(proc,), daemon=True) for proc in workers]
    try:
        for thread in threads:
            thread.start()
        running = len(threads)
        while running:
            got = results.get()
            if got is None:
                running -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield got
        for proc in workers:
            proc.wait()
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()  # a failed or interrupted run: our own workers, nothing else
                proc.wait()


def worker() -> None:
    """A local worker process (:func:`make_in_processes`), started by the stage, never by a user.

    Reads JSON lines on stdin: first ``{"cfg": <prepare_pose settings>, "staging": <folder>}``, then
    one :class:`ClipJob` a line; answers each with the clip's outcome, one JSON line on stdout
    (anything else the libraries print goes to stderr). Ends at the end of its input (also when the
    stage that started it dies). Models that cannot be built: one ``{"fatal": <message>}`` line."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the stage, which ends its workers
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (libraries) go to stderr, not the answers

    first = sys.stdin.readline()
    if not first:
        return
    setup = json.loads(first)
    maker = ClipMaker(PreparePoseConfig(**setup["cfg"]), setup["staging"])
    try:
        maker.build()
    except FaceidError as exc:
        answers.write(json.dumps({"fatal": str(exc)}) + "\n")
        return
    try:
        for line in sys.stdin:
            job = ClipJob(**json.loads(line))
            answers.write(json.dumps(maker.make_one(job)) + "\n")
    finally:
        maker.close()


def _make_on_ray(cfg: PreparePoseConfig, jobs: list[ClipJob], staging: Path, ray_address: str,
                 num_cpus: int) -> Iterator[dict]:
    import ray

    from faceid import ray_session

    with ray_session.session(ray_address, num_cpus, log_to_driver=False):
        workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers = min(workers, len(jobs))
        # a few clips per call, so that a worker's decode / pose / encode overlap; ~2 calls per worker
        per_call = max(1, min(MAX_CLIPS_PER_CALL, -(-len(jobs) // (2 * workers))))
        texts = [{"job": json.dumps(dataclasses.asdict(j))} for j in jobs]
        ds = ray.data.from_items(texts, override_num_blocks=-(-len(jobs) // per_call)).map_batches(
            ClipMaker, fn_constructor_kwargs={"cfg": cfg, "staging": str(staging)}, batch_size=per_call,
            batch_format="numpy", concurrency=workers, num_cpus=1,
        )
        print(f"prepare-pose: {len(jobs)} clips on {workers} Ray worker(s)"
              + (f" at {ray_address}" if ray_address else " (local Ray)"), file=sys.stderr)
        nodes: dict[str, int] = {}
        try:
            for row in progress(ds.iter_rows(), total=len(jobs), desc="prepare-pose"):
                outcome = json.loads(row["outcome"])
                node = outcome.pop("node")
                nodes[node] = nodes.get(node, 0) + 1
                yield outcome
        except Exception as exc:  # a worker could not start or died: show the cause; finished clips stay staged
            cause = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            raise FaceidError(f"prepare-pose: the Ray Data job failed ({type(exc).__name__}: {cause}); "
                              "clips made so far are kept and a rerun resumes") from exc
        print(f"prepare-pose: clips made on {len(nodes)} Ray node(s): "
              + ", ".join(f"{node} ({n})" for node, n in sorted(nodes.items())), file=sys.stderr)
