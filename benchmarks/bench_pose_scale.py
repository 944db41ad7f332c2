"""prepare-pose at dataset scale: frames/s end to end against the pose model's bound, on one machine.

A folder of ``--videos`` generated dance videos (``faceid sample-data`` with more videos: real
photos moved over a background, 832x480 landscape, ``--seconds`` each at 16 fps) is prepared into
81-frame 480x832 clips (the real profile's clip settings), the way ``prepare_pose.workers: 0`` (the
default) makes them on this machine (on 2 cores: one worker process per core), and in this process
(``workers: 1``: threads overlap planning, decoding, pose and encoding). The bound is one mediapipe
loop: the pose model alone (``estimate``, a graph per clip as prepare-pose builds it), single thread,
on the same clips' frames, decoded beforehand and not timed. Bound, default and in-process runs
alternate ``--repeats`` times in this process (bound, run, bound, run, ..., bound: the cores may be
shared, so each run's ratio is to the mean of the bounds just before and after it) and the medians
are reported; every run must write the same bytes (sha256 of
every output file). Then one run on local Ray with one worker per core (start-up included), unless
``--no-ray``. Appends
the section "Scale" to ``benchmarks/results/pose.md`` (replacing an older one) and prints it.

    .venv/bin/python benchmarks/bench_pose_scale.py [--videos 8] [--seconds 5.1] [--repeats 3] [--no-ray]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AISTPP_VIDEOS, AISTPP_SECONDS, FPS = 1408, 10.0, 16  # the reference dataset


def _digest(folder: Path) -> str:
    """sha256 over every file's path and bytes under ``folder``."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _bound(cfg, videos: list[Path]) -> float:
    """Frames/s of the pose model alone on the clips' frames (decoding not timed)."""
    from faceid.pose.estimate import build_estimator
    from faceid.pose.video import read_video

    frames_done, seconds = 0, 0.0
    with build_estimator(cfg) as estimator:
        for video in videos:
            frames, _ = read_video(video, fps=FPS, max_frames=cfg.num_frames)
            start = time.perf_counter()
            estimator.estimate(frames)
            seconds += time.perf_counter() - start
            frames_done += len(frames)
    return frames_done / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.1, help="per video (5.1 s at 16 fps = one 81-frame clip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true", help="skip the local Ray run")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "pose.md"))
    args = parser.parse_args()

    from faceid import sample_data
    from faceid.config import load_params
    from faceid.pose import prepare
    from faceid.pose.clips import where_to_make
    from faceid.pose.estimate import build_estimator
    from faceid.pose.video import read_video

    load_before = os.getloadavg()[0]
    params = load_params(REPO / "params.yaml", [
        "@" + str(REPO / "configs" / "wan2.1-vace-1.3b.yaml"),
        f"sample_data.photo_archive={REPO / '.cache' / 'packages' / 'face_recognition-1.3.0.tar.gz'}",
    ])
    cfg = dataclasses.replace(params.prepare_pose, estimator="mediapipe", stride=0, max_clips_per_video=1, workers=0)
    cores = os.cpu_count() or 1
    modes = {f"default (workers 0: {where_to_make(cfg, videos=args.videos, count=args.videos)})": cfg,
             "in this process (workers 1: threads)": dataclasses.replace(cfg, workers=1)}
    bounds, stage, digests = [], {mode: [] for mode in modes}, set()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = dataclasses.replace(params.sample_data, num_videos=args.videos, video_seconds=args.seconds,
                                   video_height=480, video_width=832, video_fps=FPS)
        sample_data.run(data, tmp / "sample")
        videos = tmp / "sample" / "videos"
        files = sorted(videos.glob("*.mp4"))
        with build_estimator(cfg) as estimator:  # mediapipe loaded and warm before anything is timed
            estimator.estimate(read_video(files[0], fps=FPS, max_frames=2)[0])

        bounds.append(_bound(cfg, files))
        for repeat in range(args.repeats):  # bound, run, bound, run, ..., bound: each run between two bounds
            for m, (mode, mode_cfg) in enumerate(modes.items()):
                out = tmp / f"clips-{repeat}-{m}"
                start = time.perf_counter()
                summary = prepare.run(mode_cfg, videos, None, out)
                seconds = time.perf_counter() - start
                digests.add(_digest(out))
                bounds.append(_bound(cfg, files))
                around = (bounds[-2] + bounds[-1]) / 2
                fps = summary["clips_written"] * cfg.num_frames / seconds
                stage[mode].append((summary["clips_written"], seconds, fps, around, os.getloadavg()[0]))
                print(f"repeat {repeat + 1}: {mode}: {fps:.1f} frames/s, bound around it {around:.1f} "
                      f"({fps / around:.2f})", file=sys.stderr)
        rerun = time.perf_counter()
        prepare.run(cfg, videos, None, tmp / "clips-0-0")
        rerun = time.perf_counter() - rerun
        ray_row = None
        if not args.no_ray:
            start = time.perf_counter()
            summary = prepare.run(dataclasses.replace(cfg, workers=max(2, cores)), videos, None, tmp / "clips-ray")
            seconds = time.perf_counter() - start
            ray_row = (summary["clips_written"], seconds, summary["clips_written"] * cfg.num_frames / seconds)
            same_on_ray = _digest(tmp / "clips-ray") in digests

    ratios = {mode: [f / b for _, _, f, b, _ in runs] for mode, runs in stage.items()}
    bound = statistics.median(bounds)
    default = next(iter(modes))
    fps, ratio = statistics.median(f for _, _, f, _, _ in stage[default]), statistics.median(ratios[default])
    total_frames = AISTPP_VIDEOS * AISTPP_SECONDS * FPS
    command = " ".join(["python", "benchmarks/bench_pose_scale.py"] + sys.argv[1:])
    lines = [
        "## Scale",
        "",
        f"`{command}` on {cores} CPU cores ({platform.processor() or platform.machine()}; shared with other jobs: "
        f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end). {args.videos} videos "
        f"832x480 of {args.seconds:g} s at {FPS} fps -> one {cfg.num_frames}-frame {cfg.width}x{cfg.height} clip each.",
        "",
        f"Bound: one mediapipe loop (Pose, complexity 1, a graph per clip, one thread) on the same "
        f"{args.videos} clips' frames, decoded beforehand: **{bound:.1f} frames/s** (median of {len(bounds)}, "
        f"measured before and after every run).",
        "",
        f"**prepare-pose, {default}: {fps:.1f} frames/s = {ratio:.2f} of the bound** (median of {args.repeats} "
        f"ratios, each to the mean of the bounds measured just before and just after it: "
        f"{', '.join(f'{r:.2f}' for r in ratios[default])}). Every run wrote the same bytes: "
        f"{'yes' if len(digests) == 1 else 'NO'}.",
        "",
        "| run | clips | seconds | frames/s | bound around it | / bound | load after | AIST++ (1,408 x 10 s) projected |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for repeat in range(args.repeats):
        for mode, runs in stage.items():
            clips, seconds, f, b, load = runs[repeat]
            lines.append(f"| {mode} | {clips} | {seconds:.1f} | {f:.1f} | {b:.1f} | {f / b:.2f} | {load:.1f} | "
                         f"{total_frames / f / 3600:.1f} h |")
    if ray_row is not None:
        clips, seconds, f = ray_row
        lines.append(f"| {max(2, cores)} workers on local Ray (start-up included; same bytes: "
                     f"{'yes' if same_on_ray else 'NO'}) | {clips} | {seconds:.1f} | {f:.1f} | {bound:.1f} (median) | "
                     f"{f / bound:.2f} | {os.getloadavg()[0]:.1f} | {total_frames / f / 3600:.1f} h |")
    lines += ["", f"Rerun of the finished stage (nothing redone): {rerun:.2f} s.", ""]
    section = "\n".join(lines)
    print(section)

    path = Path(args.output)
    text = path.read_text() if path.is_file() else "# prepare_pose benchmark\n"
    head = text.split("\n## Scale\n")[0].rstrip("\n")
    path.write_text(head + "\n\n" + section)


if __name__ == "__main__":
    main()
