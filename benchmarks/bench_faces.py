"""Photos per second of the face stages on this machine: the parts, the stages, many identities at once.

Photos: the face_recognition 1.3.0 sdist test images (obama x5, biden), scikit-image's astronaut and
matplotlib's grace_hopper (0.3-3 Mpx), plus ``--variants`` seeded variants of the obama photos at
phone-photo sizes (crop, flip, tilt, 1200-4000 px long side: what users upload).

1. Parts, each timed over ``--repeat`` passes after a warm-up: decode, detect, align, ``crop_face``
   (detect + align + quality), dlib embedding.
2. Stages: ``crop_faces.run`` and ``embed_faces.run`` per photo with the models built once (what a
   job pays per photo), beside the parts they are made of, with the ratio; and the one-time start-up
   (imports, model loads) separately.
3. Many identities: ``--identities`` identity folders cropped and embedded by one ``faceid`` command
   each (one model load) versus one command per identity, as a user would run them before.

Not a test: numbers depend on the machine and its load (CPU seconds are printed beside wall seconds).
Results go to ``benchmarks/results/faces.md``.

    .venv/bin/python benchmarks/bench_faces.py [--repeat 3] [--variants 24] [--identities 10]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / ".cache" / "packages" / "face_recognition-1.3.0.tar.gz"
PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg", "obama_partial_face2.jpg", "biden.jpg")
OBAMA = PHOTOS[:5]
KEEP = "<!-- written by hand below: bench_faces.py keeps it -->"


def cpu_seconds() -> float:
    """CPU time of this process, every thread (mediapipe's and the stages' own) included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_second(fn, items, repeat: int) -> float:
    for item in items:  # warm-up
        fn(item)
    start = time.perf_counter()
    for _ in range(repeat):
        for item in items:
            fn(item)
    return repeat * len(items) / (time.perf_counter() - start)


def timed(fn) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of ``fn()``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def write_variants(raw: dict[str, bytes], folder: Path, count: int, seed: int, sizes=(1200, 2000, 3000, 4000)) -> None:
    """``count`` JPEG variants of the obama photos: crop 80-100 %, maybe mirrored, tilted +-6 deg, long side from ``sizes``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        source = OBAMA[k % len(OBAMA)]
        im = Image.open(io.BytesIO(raw[source])).convert("RGB")
        zoom = rng.uniform(0.8, 1.0)
        w, h = round(im.width * zoom), round(im.height * zoom)
        x, y = int(rng.uniform(0, im.width - w)), int(rng.uniform(0, im.height - h))
        im = im.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = im.rotate(float(rng.uniform(-6, 6)), resample=Image.Resampling.BILINEAR)
        scale = int(rng.choice(sizes)) / max(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BILINEAR)
        im.save(folder / f"v{seed}_{k:03d}_{Path(source).stem}.jpg", quality=int(rng.integers(80, 95)))


def cli(*args: str) -> float:
    """Wall seconds of one ``faceid`` command in a fresh process (what a user's run costs)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "faceid.cli", "--params", str(REPO / "params.yaml"), *args], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


STARTUP = """
import time
t0 = time.perf_counter()
from faceid.config import load_params
from faceid.faces import crop, embed
from faceid.faces.detect import Aligner, import_mediapipe
import pyarrow.parquet
p = load_params({params!r})
t1 = time.perf_counter(); import_mediapipe()
t2 = time.perf_counter(); crop.face_models(p.crop_faces).__enter__()
t3 = time.perf_counter(); embed.build_embedder(p.embed_faces)
t4 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", type=int, default=24, help="phone-size variants added to the 8 real photos")
    parser.add_argument("--identities", type=int, default=10, help="identity folders in the many-identities run")
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
    parts, stages = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "in"
        src.mkdir()
        for name in PHOTOS:
            (src / name).write_bytes(raw[name])
        for name, pixels in package_photos().items():
            Image.fromarray(pixels).save(src / f"{name}.png")
        write_variants(raw, src, args.variants, seed=0)
        files = sorted(src.iterdir())
        images = [load_image(p, cfg.max_image_pixels).pixels for p in files]
        mpx = np.mean([im.shape[0] * im.shape[1] for im in images]) / 1e6
        n = len(images)

        # 1. Parts
        decode = per_second(lambda p: load_image(p, cfg.max_image_pixels), files, args.repeat)
        parts.append(("decode + EXIF + RGB (PIL)", decode))
        aligner = Aligner()
        for name in ("mediapipe", "dlib-hog"):
            detector = build_detector(name, cfg.min_detection_confidence)
            parts.append((f"detect ({name}, <= 1280 px copy)", per_second(detector.detect, images, args.repeat)))
            if name == "mediapipe":
                faces = [detector.detect(im) for im in images]
                pairs = [(im, f[select_main_face(f, *im.shape[:2])]) for im, f in zip(images, faces) if f]
                sizes = tuple(sorted(set(cfg.crop_sizes) | {QUALITY_SIZE}))
                parts.append((f"align: 5 points + chips {sizes}", per_second(lambda p: aligner.align(p[0], p[1], sizes, cfg.crop_padding), pairs, args.repeat)))
                crop_rate = per_second(lambda im: crop_face(im, detector, aligner, cfg), images, args.repeat)
                parts.append(("crop_face (detect + align + quality)", crop_rate))
            detector.close()
        embedder = embed.DlibEmbedder()
        chips = [aligner.align(im, f, (150,), cfg.crop_padding).crops[150] for im, f in pairs]
        parts.append(("embed dlib 128-D, one chip per call", per_second(lambda c: embedder.embed([c]), chips, args.repeat)))
        start = time.perf_counter()
        for _ in range(args.repeat):
            embedder.embed(chips)
        embed_rate = args.repeat * len(chips) / (time.perf_counter() - start)
        parts.append((f"embed dlib 128-D, batch of {len(chips)}", embed_rate))

        # 2. Stages, models built once (per photo), against their parts; start-up apart
        crop_parts = 1 / (1 / decode + 1 / crop_rate)
        warm = tmp / "warm_in"
        warm.mkdir()
        for name in OBAMA[:3]:
            (warm / name).write_bytes(raw[name])
        with crop.face_models(cfg) as models:
            crop.run(cfg, warm, tmp / "warm", models=models)  # first-call imports (pyarrow, ...)
            wall, cpu = timed(lambda: crop.run(cfg, src, tmp / "crops", models=models))
        accepted = len(crop.read_accepted(tmp / "crops", 150))
        stages.append((f"crop_faces.run ({n} photos)", "decode + crop_face, in series", crop_parts, n / wall, cpu / n))
        embed.run(params.embed_faces, tmp / "warm", tmp / "emb_warm", embedder=embedder)
        wall, cpu = timed(lambda: embed.run(params.embed_faces, tmp / "crops", tmp / "emb", embedder=embedder))
        stages.append((f"embed_faces.run ({accepted} crops)", "dlib embedding, batch", embed_rate, accepted / wall, cpu / accepted))
        start = subprocess.run([sys.executable, "-c", STARTUP.format(params=str(REPO / "params.yaml"))], check=True,
                               capture_output=True, text=True, cwd=REPO).stdout.split()
        startup = dict(zip(("python + faceid + pyarrow imports, params", "import mediapipe", "detector + aligner",
                            "dlib embedder"), map(float, start)))

        ref, _ = embed.load_identity_embedding(tmp / "emb")
        frames = dance_frames(images[files.index(src / "obama2.jpg")], 16, 480, 832, seed=0)
        with FaceSimScorer(ref, cfg, params.embed_faces) as scorer:
            scorer.score(frames[:2])
            start = time.perf_counter()
            scorer.score(frames)
            parts.append(("FaceSim-dlib per frame (480x832 video)", len(frames) / (time.perf_counter() - start)))

        # 3. Many identities: one command for all, or one command per identity
        people = tmp / "people"
        for k in range(args.identities):
            (people / f"id{k:02d}").mkdir(parents=True)
            for name in OBAMA:
                (people / f"id{k:02d}" / name).write_bytes(raw[name])
        photos_many = len(OBAMA) * args.identities
        one_crop = cli("crop-faces", "--input", str(people), "--output", str(tmp / "many_crops"))
        one_embed = cli("embed-faces", "--crops", str(tmp / "many_crops"), "--output", str(tmp / "many_emb"))
        each_crop = sum(cli("crop-faces", "--input", str(f), "--output", str(tmp / "each_crops" / f.name)) for f in sorted(people.iterdir()))
        each_embed = sum(cli("embed-faces", "--crops", str(tmp / "each_crops" / f.name), "--output", str(tmp / "each_emb" / f.name))
                         for f in sorted(people.iterdir()))
        shutil.rmtree(people)

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), cpu)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Face stages: throughput on CPU",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}, load average {load:.1f} "
        f"at the end; {n} real photos (8 originals + {args.variants} phone-size variants), mean {mpx:.1f} Mpx.",
        f"Command: `.venv/bin/python benchmarks/bench_faces.py` (parts: {args.repeat} timed passes after one warm-up)",
        "",
        "## Parts",
        "",
        "| part | photos/s |",
        "|---|---:|",
        *[f"| {name} | {rate:.1f} |" for name, rate in parts],
        "",
        "## Stages, per photo (models built once), against their parts",
        "",
        "| stage | parts | parts photos/s | stage photos/s | stage / parts | stage CPU s per photo |",
        "|---|---|---:|---:|---:|---:|",
        *[f"| {s} | {what} | {p:.1f} | {r:.1f} | {r / p:.0%} | {c:.3f} |" for s, what, p, r, c in stages],
        "",
        "One-time start-up of a `faceid` process (s): " + ", ".join(f"{k} {v:.2f}" for k, v in startup.items()) + ".",
        "",
        f"## Many identities: {args.identities} identity folders x the {len(OBAMA)} obama photos (0.6-3.3 Mpx)",
        "",
        "| | one command for all (s) | one command per identity (s) | speed-up |",
        "|---|---:|---:|---:|",
        f"| crop-faces | {one_crop:.1f} ({photos_many / one_crop:.1f} photos/s) | {each_crop:.1f} ({photos_many / each_crop:.1f} photos/s) | {each_crop / one_crop:.1f}x |",
        f"| embed-faces | {one_embed:.1f} | {each_embed:.1f} | {each_embed / one_embed:.1f}x |",
        "",
    ]
    output = Path(args.output)
    kept = output.read_text().split(KEEP, 1)[1] if output.is_file() and KEEP in output.read_text() else "\n"
    lines += [KEEP + kept.rstrip("\n")]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
