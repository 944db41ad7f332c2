"""prepare-pose at dataset scale: frames/s end to end, 1 worker vs all cores, against the pose model's bound.

A folder of ``--videos`` generated dance videos (``faceid sample-data`` with more videos: real
photos moved over a background, 832x480 landscape, ``--seconds`` each at 16 fps) is prepared into
81-frame 480x832 clips (the real profile's clip settings), first in one process
(``prepare_pose.workers=1``: decode / pose / encode overlapping in threads), then on local Ray with
one worker per core (``workers`` = the number of cores; Ray start-up included). The bound is mediapipe Pose alone, single process, on
the decoded frames of one clip, measured in the same run. Appends the section "Scale" to
``benchmarks/results/pose.md`` (replacing an older one) and prints it.

    .venv/bin/python benchmarks/bench_pose_scale.py [--videos 12] [--seconds 5.1]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AISTPP_VIDEOS, AISTPP_SECONDS, FPS = 1408, 10.0, 16  # the reference dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=5.1, help="per video (5.1 s at 16 fps = one 81-frame clip)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "pose.md"))
    args = parser.parse_args()

    from faceid import sample_data
    from faceid.config import load_params
    from faceid.pose import prepare
    from faceid.pose.estimate import build_estimator
    from faceid.pose.video import read_video

    load_before = os.getloadavg()[0]
    params = load_params(REPO / "params.yaml", [
        "@" + str(REPO / "configs" / "wan2.1-vace-1.3b.yaml"),
        f"sample_data.photo_archive={REPO / '.cache' / 'packages' / 'face_recognition-1.3.0.tar.gz'}",
    ])
    cfg = dataclasses.replace(params.prepare_pose, estimator="mediapipe", stride=0, max_clips_per_video=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = dataclasses.replace(params.sample_data, num_videos=args.videos, video_seconds=args.seconds,
                                   video_height=480, video_width=832, video_fps=FPS)
        sample_data.run(data, tmp / "sample")
        videos = tmp / "sample" / "videos"

        # the bound: mediapipe alone, one process, on one clip's decoded frames
        frames, _ = read_video(next(videos.glob("*.mp4")), fps=FPS, max_frames=cfg.num_frames)
        with build_estimator(cfg) as estimator:
            estimator.estimate(frames[:2])
            start = time.perf_counter()
            estimator.estimate(frames)
            bound = len(frames) / (time.perf_counter() - start)

        cores = os.cpu_count() or 1
        for label, workers in [("1 worker, in this process (threads overlap decode / pose / encode)", 1),
                               (f"{cores} workers on local Ray (start-up included)", cores)]:
            out = tmp / f"clips-{workers}"
            start = time.perf_counter()
            summary = prepare.run(dataclasses.replace(cfg, workers=workers), videos, None, out)
            seconds = time.perf_counter() - start
            frames_done = summary["clips_written"] * cfg.num_frames
            rows.append((label, summary["clips_written"], seconds, frames_done / seconds))
        rerun = time.perf_counter()
        prepare.run(cfg, videos, None, tmp / "clips-0")
        rerun = time.perf_counter() - rerun

    total_frames = AISTPP_VIDEOS * AISTPP_SECONDS * FPS
    lines = [
        "## Scale",
        "",
        f"`{' '.join(['python', 'benchmarks/bench_pose_scale.py'] + sys.argv[1:])}` on {cores} CPU cores "
        f"(shared; load average at the start: {load_before:.1f}, at the end: {os.getloadavg()[0]:.1f}). {args.videos} videos 832x480 of {args.seconds:g} s "
        f"at {FPS} fps -> one {cfg.num_frames}-frame {cfg.width}x{cfg.height} clip each.",
        "",
        f"Bound: mediapipe Pose alone, one process, same frames: **{bound:.1f} frames/s**.",
        "",
        "| run | clips | seconds | frames/s | / bound | AIST++ (1,408 x 10 s) projected |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, clips, seconds, fps in rows:
        lines.append(f"| {label} | {clips} | {seconds:.1f} | {fps:.1f} | {fps / bound:.2f} | "
                     f"{total_frames / fps / 3600:.1f} h |")
    lines += ["", f"Rerun of the finished stage (nothing redone): {rerun:.2f} s.", ""]
    section = "\n".join(lines)
    print(section)

    path = Path(args.output)
    text = path.read_text() if path.is_file() else "# prepare_pose benchmark\n"
    head = text.split("\n## Scale\n")[0].rstrip("\n")
    path.write_text(head + "\n\n" + section)


if __name__ == "__main__":
    main()
