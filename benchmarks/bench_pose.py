"""Frames per second of the pose stage's parts on this machine: decode, pose, draw, encode, whole clip.

A ~5 s 480x832 (landscape) video of a real person (obama3.jpg from the face_recognition sdist,
moved and scaled) is written with PyAV, then read back with decord, run through mediapipe Pose,
drawn and re-encoded; finally ``prepare.run`` makes one 81-frame 480x832 clip. Results go to
``benchmarks/results/pose.md``.

    .venv/bin/python benchmarks/bench_pose.py [--frames 81]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "pose.md"))
    args = parser.parse_args()

    from test_pose_video import person_frames

    from faceid.config import load_params
    from faceid.pose import prepare
    from faceid.pose.draw import draw_poses
    from faceid.pose.estimate import build_estimator
    from faceid.pose.video import read_video, write_video

    params = load_params(REPO / "params.yaml", ["@" + str(REPO / "configs" / "wan2.1-vace-1.3b.yaml")])
    cfg = dataclasses.replace(params.prepare_pose, estimator="mediapipe", stride=0, max_clips_per_video=1)
    n, h, w = args.frames, 480, 832
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        frames = person_frames(num_frames=n, height=h, width=w)
        _, t = timed(write_video, tmp / "videos" / "dancer.mp4", frames, 16)
        rows.append(("encode H.264 (PyAV, crf 18, preset fast)", f"{w}x{h}", n / t))
        read_video(tmp / "videos" / "dancer.mp4")  # warm the file cache
        (decoded, _), t = timed(read_video, tmp / "videos" / "dancer.mp4")
        rows.append(("decode (decord, native size)", f"{w}x{h}", n / t))
        _, t = timed(read_video, tmp / "videos" / "dancer.mp4", fps=16, size=(240, 416))
        rows.append(("decode + resize while decoding (decord)", "416x240", n / t))
        with build_estimator(cfg) as estimator:
            estimator.estimate(decoded[:2])  # load the graph once
            kps, t = timed(estimator.estimate, decoded)
        rows.append(("pose (mediapipe Pose, complexity 1, video mode)", f"{w}x{h}", n / t))
        detection = float((kps[..., 2] > 0).any(1).mean())
        poses, t = timed(draw_poses, kps, h, w)
        rows.append(("draw skeleton (OpenCV, ControlNet colours)", f"{w}x{h}", n / t))
        _, t = timed(write_video, tmp / "pose.mp4", poses, 16)
        rows.append(("encode pose video (PyAV)", f"{w}x{h}", n / t))
        summary, t = timed(prepare.run, cfg, tmp / "videos", None, tmp / "out")
        rows.append((f"prepare_pose end to end, one {cfg.num_frames}-frame clip", f"{cfg.width}x{cfg.height}", cfg.num_frames / t))
        _, t = timed(prepare.run, cfg, tmp / "videos", None, tmp / "out")
        rerun_s = t

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    lines = [
        "# prepare_pose benchmark",
        "",
        f"Machine: {cpu}, {os.cpu_count()} CPU cores (shared), "
        f"Python {platform.python_version()}; no GPU. `{' '.join(['python', 'benchmarks/bench_pose.py'] + sys.argv[1:])}`.",
        f"Input: {n} frames {w}x{h} at 16 fps of a real person (obama3.jpg moved and scaled); "
        f"person detected in {detection:.0%} of frames.",
        "",
        "| step | size | frames/s |",
        "|---|---|---:|",
        *[f"| {name} | {size} | {fps:.1f} |" for name, size, fps in rows],
        "",
        f"Rerun of the finished stage (checksums match, nothing redone): {rerun_s:.2f} s; "
        f"first run wrote {summary['clips_written']} clip(s).",
        "",
        "The 2 cores are shared with other jobs: consecutive runs differ by up to 2x. Pose estimation",
        "(mediapipe, CPU) bounds the stage; the ONNX estimator (DWPose/RTMPose on a GPU) is the option",
        "for large datasets. Decoding is skipped entirely for clips already done.",
        "Videos are encoded with x264 `threads=1` (same frames, same bytes); what that costs:",
        "benchmarks/results/encode.md (`benchmarks/bench_encode.py`).",
        "",
    ]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.read_text() if out.is_file() else ""
    scale = old[old.index("\n## Scale\n"):] if "\n## Scale\n" in old else ""  # bench_pose_scale.py's section stays
    out.write_text("\n".join(lines).rstrip("\n") + "\n" + scale)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
