"""``faceid prepare-pose``: dance videos -> normalised clips, pose-control videos and keypoints.

For every dance video (and its ``<name>_pose.mp4`` when given) the stage resamples to
``prepare_pose.fps``, splits clips of ``num_frames`` (4n+1) frames every ``stride`` frames, estimates
keypoints on the frames at analysis resolution (long side up to 1280 px, never below what the
crop needs), crops the same window from both videos (centred on the person when
``person_aware_crop``), resizes to ``height`` x ``width`` and writes, per clip, atomically::

    <out>/clips/<clip_id>/video.mp4     target RGB clip (H.264 yuv420p)
    <out>/clips/<clip_id>/pose.mp4      the given pose video, or the skeleton drawn ControlNet-style
    <out>/clips/<clip_id>/keypoints.npz keypoints [F, 18, 3] in clip pixels, detected [F], checksum
    <out>/clips/<clip_id>/faces.npz     face regions at source resolution (see below), checksum
    <out>/manifest.parquet              one row per clip or rejected input (docs/architecture.md)
    <out>/.faceid-output.json           the marker: a prepare-pose output (faceid.outputs)

A clip whose folder already holds the same checksum (inputs + settings) is not redone, so a rerun
does no work and a crashed run resumes. Bad inputs become ``rejected`` rows with a reason; a clip
with too few frames showing a person is written but marked ``rejected``. On ``ok`` rows ``reason``
holds notes (frame rate resampled, variable frame rate, container rotation, pose video trimmed or
resized). Rejections and notes are also printed, one line each.

Nothing usable, nothing touched: new clips are made in ``.<out>.staging`` beside the output folder
(a crashed run resumes from there too) and move into ``<out>/clips`` only when at least one clip is
``ok``; then the manifest is replaced (atomically) and clip folders no row refers to are removed.
With no ``ok`` clip the stage fails (exit code 2) and ``<out>`` stays exactly as it was.

Face regions: on ``face_samples`` frames spread evenly over each clip, decoded at the source
video's native resolution (a face in a small full-body clip is often too small to detect), the
main face (mediapipe) is cut out as a square of ``FACE_REGION_SCALE`` x the face box's longer side
(black past the frame edges) resized to ``FACE_REGION_SIZE``. ``faces.npz`` holds, for the K
sampled frames where a face was found (K may be 0): ``regions`` [K, 256, 256, 3] uint8, ``frames``
[K] int64 (index within the clip), ``boxes`` [K, 4] float32 (x0, y0, x1, y1 in source pixels),
``sizes`` [K] float32 (box shorter side, source pixels) and ``checksum``. Clips are independent
of any identity; training scores the regions per identity (faceid.train.routing).

Parts: ``faceid.pose.inputs`` (find, pair, probe and plan the videos), ``faceid.pose.geometry``
(crop windows, keypoints), ``faceid.pose.face_regions``, ``faceid.pose.clips`` (the clip makers: in
this process, where threads overlap one clip's pose model with the next clip's planning and decoding
and the previous clip's encoding, or on Ray Data). This module is the stage: the plan, the staging
folder, the manifest.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from faceid.config import PreparePoseConfig
from faceid.errors import InputError
from faceid.io import output_lock, progress, require_dir, write_parquet
from faceid.outputs import check_folder, mark
from faceid.pose.clips import (  # noqa: F401 (re-exported: prepare-pose's names, as before the split)
    CLIP_FILES, ENCODE_PRESET, LOCAL_RAY_MIN_CLIPS, LOCAL_RAY_MIN_CORES, MAX_CLIPS_PER_CALL, ClipJob, ClipMaker,
    Decoded, decode_clip, done_clip, finish_clip, make_clips, make_in_processes, where_to_make,
)
from faceid.pose.face_regions import (  # noqa: F401
    FACE_DETECTOR, FACE_MIN_CONFIDENCE, FACE_REGION_SCALE, FACE_REGION_SIZE, face_region, face_regions,
    face_sample_frames,
)
from faceid.pose.geometry import (  # noqa: F401
    ANALYSIS_LONG_SIDE, DRAW_MIN_CONFIDENCE, analysis_size, apply_crop, clip_starts, crop_box, transform_keypoints,
)
from faceid.pose.inputs import (  # noqa: F401
    FORMAT_VERSION, MAX_ASPECT_MISMATCH, MAX_LENGTH_MISMATCH, PLAN_THREADS, POSE_SUFFIX, Rejected, VideoPlan,
    caption_for, clip_checksum, find_inputs, iter_plans, load_captions, plan_video, plan_videos, reconcile_lengths,
)

STAGE = "prepare_pose"  # its name in faceid.outputs
STREAM_PLAN_THREADS = 2  # videos probed at once while clips are being made (enough to stay ahead of the pose model)

COLUMNS = (
    ("clip_id", "string"), ("source", "string"), ("start_frame", "int64"), ("num_frames", "int64"),
    ("fps", "float64"), ("height", "int64"), ("width", "int64"), ("video_path", "string"),
    ("pose_path", "string"), ("keypoints_path", "string"), ("faces_path", "string"), ("caption", "string"),
    ("pose_detection_rate", "float64"), ("num_face_regions", "int64"), ("checksum", "string"), ("status", "string"),
    ("reason", "string"),
)  # fmt: skip


def _row(**values) -> dict:
    return {name: values.get(name) for name, _ in COLUMNS}


def _clip_row(cfg: PreparePoseConfig, plan: VideoPlan, job: ClipJob, outcome: dict) -> dict:
    """The manifest row of a clip: ``ok``, or ``rejected`` (failed, or too few frames with a person)."""
    common = dict(clip_id=job.clip_id, source=plan.video.name, start_frame=int(job.clip_id.rsplit("-", 1)[1]),
                  num_frames=cfg.num_frames, fps=float(cfg.fps), height=cfg.height, width=cfg.width,
                  caption=plan.caption, checksum=job.checksum)
    if "error" in outcome:
        return _row(**common, status="rejected", reason=outcome["error"])
    rate = float(np.mean(outcome["detected"]))
    notes, status = list(plan.notes), "ok"
    if rate < cfg.min_pose_detection_rate:
        status = "rejected"
        notes.insert(0, f"person detected in {rate:.0%} of frames (< {cfg.min_pose_detection_rate:.0%})")
    rel = f"clips/{job.clip_id}"
    return _row(**common, video_path=f"{rel}/video.mp4", pose_path=f"{rel}/pose.mp4",
                keypoints_path=f"{rel}/keypoints.npz", faces_path=f"{rel}/faces.npz", pose_detection_rate=rate,
                num_face_regions=int(outcome["num_face_regions"]), status=status, reason="; ".join(notes))


def _schema():
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS])


def _clean_partial(clips_root: Path) -> None:
    """Remove leftovers of an interrupted run (temporary clip folders)."""
    if clips_root.is_dir():
        for p in clips_root.iterdir():
            if p.is_dir() and p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                shutil.rmtree(p)


def staging_dir(output_dir: Path) -> Path:
    """Where a run makes its new clips (beside the output folder, never part of it)."""
    return output_dir.parent / f".{output_dir.name}.staging"


def _move_in(src: Path, dst: Path) -> None:
    """Replace the clip folder ``dst`` by ``src`` (a finished clip in the staging folder)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        if old.exists():
            shutil.rmtree(old)
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old)
    else:
        src.rename(dst)


def report_lines(rows: list[dict]) -> list[str]:
    """What the terminal shows besides the summary: one line per rejected input or clip, and one per
    change made to an input (its notes, once per source video)."""
    lines, noted = [], set()
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"  rejected {r['clip_id'] if r['video_path'] else r['source']}: {r['reason']}")
        elif r["reason"] and r["source"] not in noted:
            noted.add(r["source"])
            lines.append(f"  note {r['source']}: {r['reason']}")
    return lines


# --------------------------------------------------------------------------- stage


def run(cfg: PreparePoseConfig, videos_dir: Path, pose_dir: Path | None, output_dir: Path, captions: Path | None = None,
        lock_wait: float = 0.0, ray_address: str = "", num_cpus: int = 0) -> dict:
    """Prepare every video in ``videos_dir``; write clips and ``manifest.parquet`` to ``output_dir``.
    Fails (:class:`InputError`), leaving ``output_dir`` as it was, when no clip is usable.
    ``lock_wait``: seconds to wait for another run writing ``output_dir`` (:func:`faceid.io.output_lock`).
    ``ray_address`` / ``num_cpus``: where the clip makers run (:func:`make_clips`; ``cfg.workers``)."""
    # 1. Check inputs; one writer per output folder
    videos_dir = require_dir(videos_dir, "a folder of dance videos")
    if pose_dir is not None:
        pose_dir = require_dir(pose_dir, "a folder of *_pose.mp4 videos")
    output_dir = check_folder(STAGE, output_dir, [videos_dir, pose_dir, captions])  # faceid.outputs
    clips_root, staging = output_dir / "clips", staging_dir(output_dir)
    table = load_captions(videos_dir, captions)
    with output_lock("prepare-pose", output_dir, lock_wait):
        pairs, rejects = find_inputs(videos_dir, pose_dir)
        rows = [_row(clip_id=p.stem, source=p.name, status="rejected", reason=reason) for p, reason in rejects]

        # 2. Plan: probe and hash each video (threads: I/O and decoder index), decide its clips; the
        #    clips not done yet (same checksum in <out>/clips or in staging = skip) are the jobs
        _clean_partial(staging)
        plans: list[VideoPlan] = []
        outcomes: dict[str, dict] = {}
        staged: set[str] = set()
        here = where_to_make(cfg, ray_address, num_cpus, videos=len(pairs)) in ("here", "processes")

        def jobs() -> Iterator[ClipJob]:
            planned = iter_plans(cfg, pairs, table, STREAM_PLAN_THREADS if here else PLAN_THREADS)
            for (video, _), plan in zip(pairs, planned if here else progress(planned, len(pairs), "prepare-pose: probe")):
                if not isinstance(plan, VideoPlan):
                    rows.append(_row(clip_id=video.stem, source=video.name, caption=plan[0], status="rejected",
                                     reason=plan[1]))
                    continue
                plans.append(plan)
                for start in plan.starts:
                    job = ClipJob.of(plan, start, cfg.num_frames)
                    done = done_clip(clips_root / job.clip_id, job.checksum)
                    if done is None and (done := done_clip(staging / job.clip_id, job.checksum)) is not None:
                        staged.add(job.clip_id)
                    if done is not None:
                        outcomes[job.clip_id] = {"clip_id": job.clip_id, "detected": done[0], "num_face_regions": done[1]}
                        continue
                    staging.mkdir(parents=True, exist_ok=True)
                    yield job
            import pyarrow.parquet  # noqa: F401 (step 4's writer loads while the last clip is made)

        # 3. Make them into the staging folder, by workers (ClipMaker: in this process or worker
        #    processes, where the first clip starts while later videos are still planned, or on Ray Data)
        written = 0
        for outcome in make_clips(cfg, jobs(), staging, ray_address, num_cpus, videos=len(pairs)):
            outcomes[outcome["clip_id"]] = outcome
            if "error" not in outcome:
                staged.add(outcome["clip_id"])
                written += 1
        skipped = len(outcomes) - written - sum("error" in o for o in outcomes.values())
        for plan in plans:
            for start in plan.starts:
                job = ClipJob.of(plan, start, cfg.num_frames)
                rows.append(_clip_row(cfg, plan, job, outcomes[job.clip_id]))

        # 4. Nothing usable: fail, output folder untouched. Else move the new clips in, replace the
        #    manifest (atomic), remove clip folders that no row refers to (older settings or inputs)
        ok = sum(r["status"] == "ok" for r in rows)
        for line in report_lines(rows):
            print(line, file=sys.stderr)
        if not ok:
            shutil.rmtree(staging, ignore_errors=True)
            raise InputError(
                f"prepare-pose: no usable clip from {len(pairs) + len(rejects)} input(s) in {videos_dir} "
                f"(reasons above, one per input); {output_dir} left as it was"
            )
        keep = {r["clip_id"] for r in rows if r["video_path"]}
        clips_root.mkdir(parents=True, exist_ok=True)
        mark(output_dir, STAGE)
        _clean_partial(clips_root)
        for clip_id in sorted(staged & keep):
            _move_in(staging / clip_id, clips_root / clip_id)
        write_parquet(output_dir / "manifest.parquet", rows, schema=_schema())
        for p in clips_root.iterdir():
            if p.is_dir() and p.name not in keep:
                shutil.rmtree(p)
        shutil.rmtree(staging, ignore_errors=True)
    summary = {
        "clips_ok": ok,
        "rejected": len(rows) - ok,
        "clips_written": written,
        "clips_skipped": skipped,
        "manifest": str(output_dir / "manifest.parquet"),
    }
    print(f"prepare-pose: {ok} clips ok, {len(rows) - ok} rejected rows; {written} written, "
          f"{skipped} already done -> {output_dir}", file=sys.stderr)
    return summary
