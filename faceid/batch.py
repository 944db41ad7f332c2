"""``faceid batch-infer`` (KFP component ``batch_infer``; not a DVC stage): many pose videos, Ray Data.

Inputs: a folder of ``*.mp4`` pose videos, a prepare-pose output folder (``manifest.parquet`` ->
``pose_path`` and ``caption`` of the ``ok`` clips) or such a manifest file. One job per pose video
(``--interpolate A,B``: ``batch_infer.interpolation_steps`` jobs per pose video, ``<name>__tKK.mp4``).

- Ray Data: ``from_items(jobs).map(Worker, concurrency=batch_infer.num_workers)``; each worker
  builds the pipeline once (``faceid.render.Generator``), encodes each distinct prompt once and, with
  ``model.compile``, compiles once (its first video; an ``--identity`` run's LoRA fused first). The
  manifest's ``prompt_encode_s`` / ``compile_s`` say what each video paid; the summary adds them up.
  Local Ray unless an address is given.
- Resumable: a video is not redone (status ``skipped``) only when it is a finished output of this
  run: its sha256 matches its manifest row (``output_sha256``) and so does what it was made with
  (``made_with``: settings, identities' content, pose video's content, model config). Any other
  existing file is redone, with a line saying why. Videos are written atomically and the manifest is
  rewritten after each video made, so a run stopped half-way resumes.
- Files of a pose-videos folder that are not videos, sub-folders, and clips a prepare-pose manifest
  marks not ``ok`` are listed on the terminal with the reason they are left out.
- A failing video is recorded (status ``failed`` + error, one line on the terminal) and the others
  continue. When no video is generated and none existed, the stage fails and ``<out>`` is left as
  it was (no manifest written).
- Checked before Ray or a model starts: settings, pose videos, every identity (folder or registry name).
- ``<out>/manifest.parquet``: one row per job with settings (face_scale, lora_scale, guidance,
  steps, seed), whether a VACE reference image was passed, frames of the pose video and how many
  were trimmed to 4n+1 (``source_frames``, ``trimmed_frames``; also printed), timings and FaceSim
  to the (main) identity's own embedding.
- One writer: ``<out>`` is locked for the run (:func:`faceid.io.output_lock`). Ray: ``faceid.ray_session``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from faceid.errors import FaceidError, InputError

MANIFEST = "manifest.parquet"
STATUSES = ("ok", "failed", "skipped")


# --------------------------------------------------------------------------- jobs (pure)


def list_pose_videos(pose_videos: Path) -> list[dict]:
    """``[{"name", "pose_video", "caption"}]`` from a folder of videos (``.mp4``, ``.mov``, ...: the
    extensions prepare-pose reads), a prepare-pose folder or its manifest. What is left out is printed
    with its reason: other files and sub-folders of a folder, clips a manifest marks not ``ok``."""
    from faceid.io import read_parquet

    pose_videos = Path(pose_videos)
    manifest = pose_videos if pose_videos.suffix == ".parquet" else pose_videos / MANIFEST
    if manifest.is_file():
        root = manifest.parent
        table = read_parquet(manifest)
        rows = [r for r in table if r.get("status", "ok") == "ok" and r.get("pose_path")]
        items = [{"name": str(r.get("clip_id") or Path(r["pose_path"]).parent.name), "pose_video": str(root / r["pose_path"]),
                  "caption": r.get("caption") or None} for r in rows]
        not_ok = [r for r in table if not (r.get("status", "ok") == "ok" and r.get("pose_path"))]
        if not_ok:
            print(f"batch-infer: {len(not_ok)} of {len(not_ok) + len(rows)} clips in {manifest} not rendered: "
                  f"status {', '.join(sorted({str(r.get('status')) for r in not_ok}))} (prepare-pose's reasons are in that manifest)")
    elif pose_videos.is_dir():
        from faceid.pose.video import VIDEO_EXTENSIONS

        entries = sorted(pose_videos.iterdir())
        items = [{"name": p.stem, "pose_video": str(p), "caption": None}
                 for p in entries if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS]
        for p in entries:  # every entry left out is said, with its reason
            if p.is_dir():
                print(f"batch-infer: ignored {p}: a folder (pose videos are read from the top level of {pose_videos})")
            elif p.suffix.lower() not in VIDEO_EXTENSIONS:
                print(f"batch-infer: ignored {p}: not a video ({', '.join(VIDEO_EXTENSIONS)})")
    else:
        raise InputError(f"{pose_videos} is a file; expected a folder of pose videos, a prepare-pose output folder or its "
                         f"{MANIFEST}" if pose_videos.is_file() else
                         f"{pose_videos}: not found (expected a folder of .mp4 pose videos or a prepare-pose output folder)")
    if not items:
        raise InputError(f"{pose_videos}: no pose videos (video files such as *.mp4, or ok clips in {MANIFEST})")
    names = [i["name"] for i in items]
    if len(set(names)) != len(names):
        raise InputError(f"{pose_videos}: pose video names are not unique ({sorted({n for n in names if names.count(n) > 1})[:3]})")
    return items


def plan_jobs(items: list[dict], output_dir: Path, spec: dict, interpolation_steps: int) -> list[dict]:
    """One job per pose video (``spec`` = identity or blend), or ``interpolation_steps`` per video."""
    jobs = []
    for item in items:
        if "interpolate" in spec:
            for k in range(interpolation_steps):
                step = {**spec, "step": k, "steps": interpolation_steps}
                jobs.append({**item, "key": f"{item['name']}__t{k:02d}", "output": str(output_dir / f"{item['name']}__t{k:02d}.mp4"),
                             "spec": json.dumps(step)})
        else:
            jobs.append({**item, "key": item["name"], "output": str(output_dir / f"{item['name']}.mp4"), "spec": json.dumps(spec)})
    return jobs


def summarize(rows: list[dict]) -> dict:
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    return {"total": len(rows), **counts, "failures": {r["key"]: r["error"] for r in rows if r["status"] == "failed"}}


# --------------------------------------------------------------------------- worker


class Worker:
    """A Ray Data callable class: builds the pipeline once per worker, renders one job per call."""

    def __init__(self, params, settings, mlflow_uri: str | None, adapter: str | None = None):
        from faceid.render import Generator

        self.params, self.settings = params, settings
        self.generator = Generator(params, mlflow_uri=mlflow_uri, adapter=adapter)
        self.generator.pipe.set_progress_bar_config(disable=True)
        self._interpolations: dict[tuple, list] = {}
        self._scorers: dict[str, object] = {}

    def conditioning(self, spec: dict):
        """``(conditioning, main identity ref, t)`` for a job spec."""
        g = self.generator
        if "interpolate" in spec:
            a, b = spec["interpolate"]
            key = (a, b, spec["steps"])
            if key not in self._interpolations:
                self._interpolations[key] = g.interpolation(a, b, spec["steps"])
            t, cond = self._interpolations[key][spec["step"]]
            return cond, (a if t <= 0.5 else b), t
        if "blend" in spec:
            pairs = [(ref, float(w)) for ref, w in spec["blend"]]
            return g.conditioning(blend=pairs), max(pairs, key=lambda p: p[1])[0], None
        return g.conditioning(spec["identity"]), spec["identity"], None

    def facesim(self, ref: str, output: str) -> dict:
        """FaceSim of the written video to the identity's own embedding (same embedder only)."""
        from faceid.faces.similarity import FaceSimScorer
        from faceid.pose.video import read_video

        identity = self.generator.identity(ref)
        if identity.card["embedder"] != self.params.embed_faces.embedder:
            return {"facesim": None, "face_detection_rate": None}
        if ref not in self._scorers:
            self._scorers[ref] = FaceSimScorer(identity.embedding.numpy(), self.params.crop_faces, self.params.embed_faces)
        frames, _ = read_video(output)
        res = self._scorers[ref].score(frames)
        return {"facesim": res["mean"], "facesim_std": res["std"], "face_detection_rate": res["detection_rate"]}

    def __call__(self, job: dict) -> dict:
        from faceid.render import render_one

        t0 = time.perf_counter()
        row = {"key": job["key"], "pose_video": job["pose_video"], "output": job["output"], "worker": f"{os.uname().nodename}:{os.getpid()}"}
        try:
            spec = json.loads(job["spec"])
            if "identity" in spec:  # model.compile: the one identity's LoRA fused before the worker's first video
                self.generator.fuse_identity(spec["identity"], self.settings)
            cond, main_ref, t = self.conditioning(spec)
            row.update(render_one(self.generator, cond, Path(job["pose_video"]), Path(job["output"]), self.settings, job["caption"]))
            row.update(interp_t=t, made_with=job["made_with"])
            row.update(self.facesim(main_ref, job["output"]))
            row.update(status="ok", error=None)
        except Exception as exc:  # one bad video must not stop the batch
            message = str(exc) if isinstance(exc, FaceidError) else f"{type(exc).__name__}: {exc}"
            row.update(status="failed", error=message.splitlines()[0][:500] if message else type(exc).__name__)
        row["total_s"] = round(time.perf_counter() - t0, 4)
        return {"result": json.dumps(row, default=str)}


# --------------------------------------------------------------------------- Ray


def _run_ray(params, jobs: list[dict], settings, ray_address: str, mlflow_uri: str | None, finished,
             adapter: str | None = None) -> None:
    """Render ``jobs`` on Ray Data workers; ``finished(row)`` is called with each manifest row as it arrives.
    ``adapter``: the shared adapter people are rendered through (zero-shot), if any."""
    import ray

    from faceid import ray_session
    from faceid.io import progress

    with ray_session.session(ray_address, params.ray.num_cpus, log_to_driver=False):
        cfg = params.batch_infer
        ds = ray.data.from_items(jobs, override_num_blocks=len(jobs)).map(
            Worker,
            fn_constructor_kwargs={"params": params, "settings": settings, "mlflow_uri": mlflow_uri, "adapter": adapter},
            compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
            num_cpus=1,
            num_gpus=1 if cfg.use_gpu else 0,
        )
        try:
            for r in progress(ds.iter_rows(), total=len(jobs), desc="batch-infer"):
                finished(json.loads(r["result"]))
        except Exception as exc:  # a worker could not start (e.g. model weights missing there): show the cause
            cause = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            raise FaceidError(f"batch-infer: the Ray Data job failed ({type(exc).__name__}: {cause}); "
                              f"outputs written so far are kept and a rerun resumes") from exc


# --------------------------------------------------------------------------- entry point


def run(
    params,
    identity: str | None,
    pose_videos: Path,
    output_dir: Path,
    blend: str | None = None,
    interpolate: str | None = None,
    ray_address: str = "",
    mlflow_uri: str | None = None,
    settings=None,
    lock_wait: float = 0.0,
    adapter: str | None = None,
) -> dict:
    """Generate a video per pose video into ``output_dir`` (resumable); write ``manifest.parquet``.
    ``settings``: :class:`faceid.render.Settings` built at the door (None: ``batch_infer`` as it is).
    Registry identities are pinned to the version their alias names now: every worker renders the
    same version, downloaded once per machine (``tracking.download_dir``).
    Fails, leaving ``output_dir`` as it was, when no video is generated and none exists already.
    ``lock_wait``: seconds to wait for another run writing ``output_dir`` (:func:`faceid.io.output_lock`).
    ``adapter``: a shared adapter (``train-shared``); identities are then people's embed-faces outputs (zero-shot)."""
    from faceid import tracking
    from faceid.io import output_lock
    from faceid.outputs import check_folder, in_place
    from faceid.render import load_identities, parse_blend, parse_interpolate, settings_from

    # 1. Check inputs before any model or Ray starts: the output (new, empty or an earlier batch-infer
    #    output, apart from every input: faceid.outputs), settings, pose videos, identities
    #    (compatibility with the base model); one writer per output folder
    pose_videos = Path(pose_videos)
    named = [identity, *([r for r, _ in parse_blend(blend)] if blend else []), *(interpolate or "").split(","), adapter]
    output_dir = check_folder("batch_infer", output_dir, [pose_videos, pose_videos.parent if pose_videos.suffix == ".parquet"
                                                          else None, *(r.strip() for r in named if r)])
    settings = settings or settings_from(params.batch_infer)
    items = list_pose_videos(pose_videos)

    def pinned(ref) -> str:
        ref = str(ref)
        return tracking.pin_version(ref, mlflow_uri) if ref.startswith(tracking.MODELS_PREFIX) and mlflow_uri else ref

    if interpolate:
        a, b = (pinned(r) for r in parse_interpolate(interpolate, identity))
        spec, refs = {"interpolate": [a, b]}, [a, b]
    elif blend:
        pairs = [(pinned(r), w) for r, w in parse_blend(blend)]
        spec, refs = {"blend": [[r, w] for r, w in pairs]}, [r for r, _ in pairs]
    elif identity:
        ref = pinned(identity)
        spec, refs = {"identity": ref}, [ref]
    else:
        raise InputError("batch-infer: expected --identity, --blend or --interpolate")
    if adapter:  # people rendered zero-shot through one shared adapter (pinned like the identities)
        spec["adapter"] = pinned(adapter)
    load_identities(refs, params, mlflow_uri, adapter=spec.get("adapter"))
    with output_lock("batch-infer", output_dir, lock_wait), in_place("batch_infer", output_dir):
        return _generate(params, items, spec, output_dir, settings, ray_address, mlflow_uri)  # failed: as it was


def _generate(params, items: list[dict], spec: dict, output_dir: Path, settings, ray_address: str,
              mlflow_uri: str | None) -> dict:
    """Steps 2-4 of :func:`run`."""
    from faceid.io import read_parquet, write_parquet

    # 2. Plan: skip a video only when it is a finished output of this run (resume): the file's sha256
    #    and what it was made with (settings, identities, pose video, model) equal its manifest row's;
    #    the earlier row is kept. Anything else that exists is redone, and said why.
    output_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(items, output_dir, spec, params.batch_infer.interpolation_steps)
    made_with = made_with_fingerprints(params, jobs, spec, settings, mlflow_uri)
    for job in jobs:
        job["made_with"] = made_with[job["key"]]
    previous = {}
    if (output_dir / MANIFEST).is_file():
        previous = {r["key"]: r for r in read_parquet(output_dir / MANIFEST)}
    rows, todo = {}, []
    for job in jobs:
        reason = redo_reason(job, previous.get(job["key"]))
        if reason is None:
            rows[job["key"]] = {**previous[job["key"]], "key": job["key"], "pose_video": job["pose_video"],
                                "output": job["output"], "status": "skipped", "error": None}
        else:
            todo.append(job)
            if reason:
                print(f"  redo {job['key']}: {reason}")

    # 2b. Pose videos the model cannot take (unreadable, larger than 720p, sides not multiples of 16)
    #     fail here, before Ray or a model starts
    todo = _check_pose_videos(todo, rows)

    # 3. Generate the rest on Ray Data workers; the manifest is rewritten after each video made, so a
    #    run stopped half-way resumes from what it finished
    def finished(row: dict) -> None:
        rows[row["key"]] = row
        if row["status"] == "ok":
            done = [rows[j["key"]] for j in jobs if j["key"] in rows and rows[j["key"]]["status"] != "failed"]
            columns = list(dict.fromkeys(k for r in done for k in r))
            write_parquet(output_dir / MANIFEST, [{c: r.get(c) for c in columns} for r in done])

    if todo:
        _run_ray(params, todo, settings, ray_address, mlflow_uri, finished, spec.get("adapter"))

    # 4. Nothing usable (every video failed, none existed): fail, output folder untouched. Else the
    #    manifest in job order (same columns on every row), a summary, one line per failure and per trim
    ordered = [rows[j["key"]] for j in jobs]
    summary = summarize(ordered)
    for line in report_lines(ordered) + speed_lines(ordered):
        print(line)
    if summary["ok"] + summary["skipped"] == 0:
        raise FaceidError(f"batch-infer: all {summary['total']} videos failed (reasons above, one per video; first: "
                          f"{next(iter(summary['failures'].values()))}); {output_dir} left as it was")
    columns = list(dict.fromkeys(k for r in ordered for k in r))
    write_parquet(output_dir / MANIFEST, [{c: r.get(c) for c in columns} for r in ordered])
    print(f"batch-infer: {summary['ok']} generated, {summary['skipped']} skipped (finished earlier, same settings and "
          f"checksum), {summary['failed']} failed -> {output_dir / MANIFEST}")
    return summary


def _check_pose_videos(jobs: list[dict], rows: dict) -> list[dict]:
    """The jobs whose pose video passes :func:`faceid.render.check_pose_video`; the others get a
    ``failed`` row in ``rows`` with the reason."""
    from faceid.render import check_pose_video

    errors: dict[str, str | None] = {}
    passed = []
    for job in jobs:
        path = job["pose_video"]
        if path not in errors:
            try:
                check_pose_video(path)
                errors[path] = None
            except FaceidError as exc:
                errors[path] = str(exc).splitlines()[0][:500]
        if errors[path] is None:
            passed.append(job)
        else:
            rows[job["key"]] = {"key": job["key"], "pose_video": path, "output": job["output"], "status": "failed",
                                "error": errors[path]}
    return passed


def made_with_fingerprints(params, jobs: list[dict], spec: dict, settings, mlflow_uri: str | None) -> dict[str, str]:
    """``{job key: sha256}`` of everything a video is made from: the render settings, the job's
    identity spec (registry names pinned to a version) and the content of each identity folder, the
    pose video's content and caption, the frame-count policy and the base model's config."""
    import dataclasses
    import hashlib

    from faceid.io import sha256_file
    from faceid.render import identity_sha256, resolve_identity

    refs = spec.get("interpolate") or [r for r, _ in spec.get("blend", [])] or [spec["identity"]]
    if spec.get("adapter"):  # zero-shot: people's embeddings through the shared adapter
        from faceid.train.data import embeddings_sha256

        identities = {str(r): embeddings_sha256(r) for r in refs}
        identities["adapter"] = identity_sha256(resolve_identity(spec["adapter"], mlflow_uri, params.tracking.download_dir))
    else:
        identities = {str(r): identity_sha256(resolve_identity(r, mlflow_uri, params.tracking.download_dir)) for r in refs}
    common = {"settings": dataclasses.asdict(settings), "identities": identities,
              "frame_count_policy": params.batch_infer.frame_count_policy, "model": dataclasses.asdict(params.model)}
    pose_sha = {}
    out = {}
    for job in jobs:
        path = Path(job["pose_video"])
        if path not in pose_sha:
            pose_sha[path] = sha256_file(path) if path.is_file() else None
        body = {**common, "spec": job["spec"], "caption": job["caption"], "pose_video": pose_sha[path]}
        out[job["key"]] = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return out


def redo_reason(job: dict, row: dict | None) -> str | None:
    """None when ``job``'s output is a finished output of this run (skip it); else why it is made:
    "" for an output not there yet, a sentence for one that exists but is not that."""
    from faceid.io import sha256_file

    output = Path(job["output"])
    if not output.is_file():
        return ""
    if row is None or row.get("status") not in ("ok", "skipped") or not row.get("output_sha256"):
        return f"{output.name} exists but is not a finished output in this folder's {MANIFEST}"
    if row.get("made_with") != job["made_with"]:
        return (f"{output.name} was made with other settings, identity, pose video or model "
                f"(its {MANIFEST} row: face_scale {row.get('face_scale')}, lora_scale {row.get('lora_scale')}, "
                f"seed {row.get('seed')}, identity {row.get('identity')})")
    if sha256_file(output) != row["output_sha256"]:
        return f"{output.name} changed since it was written (sha256 differs from {MANIFEST})"
    return None


def speed_lines(rows: list[dict]) -> list[str]:
    """What prompt encoding and compilation cost the videos made now (manifest columns
    ``prompt_encode_s``, ``compile_s``): each worker encodes a distinct prompt once and compiles once."""
    made = [r for r in rows if r["status"] == "ok" and r.get("generate_s") is not None]
    if not made:
        return []
    encode = [r.get("prompt_encode_s") or 0.0 for r in made]
    lines = [f"  prompt encoding: {sum(e > 0 for e in encode)} of {len(made)} videos encoded a new prompt, "
             f"{sum(encode):.2f} s in all ({sum(encode) / len(made):.3f} s a video; the others reused it)"]
    compiled = [r["compile_s"] for r in made if r.get("compile_s") is not None]
    if compiled:
        lines.append(f"  torch.compile (model.compile): {len(compiled)} worker(s) compiled on their first video, "
                     f"{max(compiled):.1f} s at most")
    return lines


def report_lines(rows: list[dict]) -> list[str]:
    """One line per failed video and per pose video whose frames were changed (trimmed to 4n+1)."""
    lines = []
    for r in rows:
        if r["status"] == "failed":
            lines.append(f"  failed {r['key']}: {r['error']}")
        elif r["status"] == "ok" and r.get("trimmed_frames"):
            lines.append(f"  trimmed {r['key']}: pose video {r['source_frames']} frames -> {r['num_frames']} "
                         f"(4n+1; batch_infer.frame_count_policy=fix drops the last {r['trimmed_frames']})")
    return lines
