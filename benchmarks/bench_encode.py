"""What deterministic H.264 encoding costs: x264 with ``threads=1`` (faceid's setting) vs x264's own threads.

The same 81 frames 480x832 of a real person (tests/test_pose_video.person_frames, as bench_pose.py)
are encoded ``--repeat`` times per setting with PyAV exactly as ``faceid.pose.video.write_video``
does (its :func:`encoder_options`, only ``threads`` changed for the comparison); each run's file is
hashed, so the table also shows whether the setting gives the same bytes every time. Last, two
clips encoded at once on two threads with ``threads=1`` (how prepare-pose's workers use the cores).
Results go to ``benchmarks/results/encode.md``.

    .venv/bin/python benchmarks/bench_encode.py [--frames 81] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def encode(path: Path, frames, options: dict) -> float:
    """Seconds to encode ``frames`` to ``path`` at 16 fps with x264 ``options`` (write_video's loop)."""
    import av

    from faceid.pose.video import CONTAINER_OPTIONS

    start = time.perf_counter()
    with av.open(str(path), mode="w", format="mp4", options=CONTAINER_OPTIONS) as container:
        stream = container.add_stream("libx264", rate=Fraction(16))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = options
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "encode.md"))
    args = parser.parse_args()

    from test_pose_video import person_frames

    from faceid.pose.video import encoder_options

    n, h, w = args.frames, 480, 832
    frames = person_frames(n, h, w)
    rows = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for preset in ("veryfast", "fast"):  # prepare-pose clips / everything else (render, sample data)
            for threads, label in (("1", "threads=1 (faceid)"), ("0", "x264 default (auto threads)")):
                options = {**encoder_options(18, preset), "threads": threads}
                times, hashes = [], set()
                for k in range(args.repeat):
                    path = tmp / f"{preset}_{threads}_{k}.mp4"
                    times.append(encode(path, frames, options))
                    hashes.add(hashlib.sha256(path.read_bytes()).hexdigest())
                rows.append((f"{label}, preset {preset}", n / statistics.median(times), len(hashes)))
        options = encoder_options(18, "veryfast")
        start = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda k: encode(tmp / f"parallel_{k}.mp4", frames, options), range(2)))
        seconds = time.perf_counter() - start
        files = len({hashlib.sha256((tmp / f"parallel_{k}.mp4").read_bytes()).hexdigest() for k in range(2)})
        rows.append(("threads=1, preset veryfast, 2 clips at once (2 threads)", 2 * n / seconds, files))

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    lines = [
        "# Deterministic H.264 encoding: what threads=1 costs",
        "",
        f"Machine: {cpu}, {os.cpu_count()} CPU cores (shared; load average {load:.1f} at the start), "
        f"Python {platform.python_version()}. `{' '.join(['python', 'benchmarks/bench_encode.py'] + sys.argv[1:])}`.",
        f"Input: {n} frames {h}x{w} (H x W) of a real person (obama3.jpg moved and scaled), crf 18, yuv420p, "
        f"encoded {args.repeat} times per setting with PyAV as `faceid.pose.video.write_video` does; "
        "frames/s is the median run; 'files' counts the distinct files those runs wrote (1 = same bytes).",
        "",
        "| x264 setting | frames/s | files |",
        "|---|---:|---:|",
        *[f"| {name} | {fps:.1f} | {files} |" for name, fps, files in rows],
        "",
        "faceid encodes with `threads=1` (`faceid.pose.video.encoder_options`): x264's threads make the",
        "bytes depend on scheduling (not in every run: ../shared/FEASIBILITY.md saw 5 different files in 8",
        "encodes of 48 frames; tests/test_pose_prepare.py failed about 1 run in 4). On a machine with more",
        "cores the single-thread cost is larger; prepare-pose encodes several clips at once (its workers),",
        "which uses the cores instead (last row).",
        "",
    ]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
