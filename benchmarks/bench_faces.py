"""Images per second of the face stages on this machine: decode, detect, align + quality, embed, FaceSim.

Real photos: the face_recognition 1.3.0 sdist test images (obama x5, biden) plus scikit-image's
astronaut and matplotlib's grace_hopper, ~0.3-3 Mpx each. Each part is timed over ``--repeat``
passes after one warm-up pass; the whole ``crop.run`` / ``embed.run`` stages are timed once
(atomic writes of crops, manifest and contact sheet included). Results go to
``benchmarks/results/faces.md``. Not a test: numbers depend on the machine.

    .venv/bin/python benchmarks/bench_faces.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / ".cache" / "packages" / "face_recognition-1.3.0.tar.gz"
PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg", "obama_partial_face2.jpg", "biden.jpg")


def per_second(fn, items, repeat: int) -> float:
    for item in items:  # warm-up
        fn(item)
    start = time.perf_counter()
    for _ in range(repeat):
        for item in items:
            fn(item)
    return repeat * len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "faces.md"))
    args = parser.parse_args()

    from PIL import Image

    from faceid.config import load_params
    from faceid.faces import crop, embed
    from faceid.faces.crop import QUALITY_SIZE, crop_face, load_image
    from faceid.faces.detect import Aligner, build_detector, select_main_face
    from faceid.faces.similarity import FaceSimScorer
    from faceid.sample_data import dance_frames, extract_archive_photos, package_photos

    params = load_params(REPO / "params.yaml")
    cfg = params.crop_faces
    raw = extract_archive_photos(ARCHIVE)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "in"
        src.mkdir()
        for name in PHOTOS:
            (src / name).write_bytes(raw[name])
        for name, pixels in package_photos().items():
            Image.fromarray(pixels).save(src / f"{name}.png")
        files = sorted(src.iterdir())
        images = [load_image(p, cfg.max_image_pixels).pixels for p in files]
        mpx = np.mean([im.shape[0] * im.shape[1] for im in images]) / 1e6
        n = len(images)

        rows.append(("decode + EXIF + RGB (PIL)", per_second(lambda p: load_image(p, cfg.max_image_pixels), files, args.repeat)))
        aligner = Aligner()
        for name in ("mediapipe", "dlib-hog"):
            detector = build_detector(name, cfg.min_detection_confidence)
            rows.append((f"detect ({name}, <= 1280 px copy)", per_second(detector.detect, images, args.repeat)))
            if name == "mediapipe":
                faces = [detector.detect(im) for im in images]
                pairs = [(im, f[select_main_face(f, *im.shape[:2])]) for im, f in zip(images, faces)]
                sizes = tuple(sorted(set(cfg.crop_sizes) | {QUALITY_SIZE}))
                rows.append((f"align: 5 points + chips {sizes}", per_second(lambda p: aligner.align(p[0], p[1], sizes, cfg.crop_padding), pairs, args.repeat)))
                rows.append(("crop_face (detect + align + quality)", per_second(lambda im: crop_face(im, detector, aligner, cfg), images, args.repeat)))
            detector.close()

        embedder = embed.DlibEmbedder()
        chips = [aligner.align(im, f, (150,), cfg.crop_padding).crops[150] for im, f in pairs]
        rows.append(("embed dlib 128-D, one chip per call", per_second(lambda c: embedder.embed([c]), chips, args.repeat)))
        start = time.perf_counter()
        for _ in range(args.repeat):
            embedder.embed(chips)
        rows.append((f"embed dlib 128-D, batch of {n}", args.repeat * n / (time.perf_counter() - start)))

        start = time.perf_counter()
        crop.run(cfg, src, tmp / "crops")
        rows.append((f"stage crop_faces.run ({n} photos, writes included)", n / (time.perf_counter() - start)))
        start = time.perf_counter()
        embed.run(params.embed_faces, tmp / "crops", tmp / "emb")
        rows.append((f"stage embed_faces.run ({n} crops, writes included)", n / (time.perf_counter() - start)))

        ref, _ = embed.load_identity_embedding(tmp / "emb")
        frames = dance_frames(images[files.index(src / "obama2.jpg")], 16, 480, 832, seed=0)
        with FaceSimScorer(ref, cfg, params.embed_faces) as scorer:
            scorer.score(frames[:2])
            start = time.perf_counter()
            scorer.score(frames)
            rows.append(("FaceSim-dlib per frame (480x832 video)", len(frames) / (time.perf_counter() - start)))

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), cpu)
    lines = [
        "# Face stages: throughput on CPU",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}; "
        f"{n} real photos, mean {mpx:.1f} Mpx; {args.repeat} timed passes after one warm-up.",
        "Command: `.venv/bin/python benchmarks/bench_faces.py`",
        "",
        "| part | images/s |",
        "|---|---:|",
        *[f"| {name} | {rate:.1f} |" for name, rate in rows],
        "",
        "Notes: detection runs on a copy downscaled to <= 1280 px, alignment on a region around the face,",
        "so cost barely grows with photo size. The dlib ResNet embedding (~0.1-0.2 s per face) dominates",
        "embed_faces and FaceSim. crop_faces.run adds hashing, decoding, PNG writes of every crop size",
        "and the contact sheet. The machine's cores are shared with other jobs: expect +-30 %.",
        "",
    ]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
