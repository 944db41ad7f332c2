"""``faceid sample-data``: a deterministic sample identity and sample dance videos from real photos.

Real photos only, from installed/registry packages, nothing downloaded at run time:
- the PyPI sdist of face_recognition 1.3.0 (``make install`` fetches it into ``.cache/packages``):
  its ``tests/test_images`` hold several photos of one person (obama, obama2, obama3 full body,
  a partial face, and ``32bit.png``, an RGBA copy of obama2) and one of another person (biden);
- scikit-image's ``astronaut`` and matplotlib's ``grace_hopper.jpg``: other people.

The dance videos are a real person's photo moved, scaled and tilted over time (a camera
"dance"), so pose and face detectors see a real human in every frame.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np

from faceid.config import SampleDataConfig
from faceid.errors import InputError
from faceid.io import atomic_dir, output_lock, progress
from faceid.outputs import check_folder, mark

ARCHIVE_MEMBER_DIR = "face_recognition-1.3.0/tests/test_images/"
# file in the archive -> file name in the sample identity
IDENTITY_PHOTOS = {
    "obama.jpg": "obama.jpg",
    "obama2.jpg": "obama2.jpg",
    "obama3.jpg": "obama3.jpg",
    "obama_partial_face.jpg": "obama_partial_face.jpg",
    "32bit.png": "obama2_copy_rgba.png",  # a duplicate: crop_faces must reject it
}
OTHER_PHOTOS = {"biden.jpg": "biden.jpg"}
# photo -> video; the identity's own full-body and upper-body photos "dance"
VIDEO_SOURCES = ("obama3.jpg", "obama2.jpg", "biden.jpg")
IDENTITY_NAME = "obama"
STAGE = "sample_data"
# <output>/people/<name>/: several people for train-shared (crop-faces / embed-faces on the folder). A person
# with one real photo gets two more views of it (mirrored; zoomed and tilted) to reach crop_faces.min_photos 3:
# views of one photo, not other photos of the person (a real shared adapter needs many people's own photos)
PEOPLE_VIEWS = (("", None), ("_mirror", "mirror"), ("_zoom", "zoom"))


def extract_archive_photos(archive: Path) -> dict[str, bytes]:
    """Return ``{file name: bytes}`` of the test images inside the face_recognition sdist."""
    archive = Path(archive)
    if not archive.is_file():
        raise InputError(
            f"{archive}: photo archive not found (expected the face_recognition 1.3.0 source archive; "
            "`make install` fetches it with: pip download --no-deps --no-binary :all: "
            "face_recognition==1.3.0 -d .cache/packages)"
        )
    photos: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith(ARCHIVE_MEMBER_DIR):
                    photos[member.name[len(ARCHIVE_MEMBER_DIR):]] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{archive}: not a readable .tar.gz archive ({exc})") from exc
    missing = sorted((set(IDENTITY_PHOTOS) | set(OTHER_PHOTOS)) - set(photos))
    if missing:
        raise InputError(f"{archive}: archive lacks {', '.join(missing)} under {ARCHIVE_MEMBER_DIR}")
    return photos


def package_photos() -> dict[str, np.ndarray]:
    """Photos of other people shipped inside installed packages (RGB uint8)."""
    import matplotlib.cbook
    from PIL import Image
    from skimage import data

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    return {"astronaut": data.astronaut(), "grace_hopper": hopper}


def photo_view(photo: np.ndarray, kind: str | None) -> np.ndarray:
    """A view of a photo for the sample people: as is, mirrored, or zoomed in 15 % and tilted 4 degrees (pure)."""
    import cv2

    if kind is None:
        return photo
    if kind == "mirror":
        return np.ascontiguousarray(photo[:, ::-1])
    h, w = photo.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 4.0, 1.15)
    return cv2.warpAffine(photo, m, (w, h), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)


def dance_frames(photo: np.ndarray, num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Move a photo of a person over a background: sway, bob, zoom and tilt (pure function)."""
    import cv2

    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * math.pi, size=4)
    # background: a fixed vertical gradient with a floor line
    ramp = np.linspace(40, 110, height, dtype=np.float32)[:, None, None]
    background = np.broadcast_to(ramp * np.array([0.8, 0.9, 1.0], np.float32), (height, width, 3)).astype(np.uint8)
    ph, pw = photo.shape[:2]
    base = 0.85 * min(height / ph, width / pw)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        t = i / max(num_frames - 1, 1) * 2 * math.pi
        scale = base * (1.0 + 0.08 * math.sin(2 * t + phase[0]))
        angle = 6.0 * math.sin(3 * t + phase[1])
        dx = 0.12 * width * math.sin(t + phase[2])
        dy = 0.04 * height * math.sin(4 * t + phase[3])
        m = cv2.getRotationMatrix2D((pw / 2, ph / 2), angle, scale)
        m[0, 2] += width / 2 - pw / 2 + dx
        m[1, 2] += height / 2 - ph / 2 + dy
        frames[i] = cv2.warpAffine(photo, m, (width, height), borderMode=cv2.BORDER_TRANSPARENT, dst=background.copy())
    return frames


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def run(cfg: SampleDataConfig, output: Path, lock_wait: float = 0.0) -> dict:
    """Write ``<output>/identities/obama``, ``<output>/others``, ``<output>/people/<name>`` (train-shared)
    and ``<output>/videos`` atomically
    (one writer at a time: :func:`faceid.io.output_lock`)."""
    from PIL import Image

    from faceid.pose.video import write_video

    output = check_folder(STAGE, output, [cfg.photo_archive])  # faceid.outputs: new, empty or its own earlier output
    photos = extract_archive_photos(Path(cfg.photo_archive))
    num_frames = int(round(cfg.video_seconds * cfg.video_fps))
    if num_frames < 1:
        raise InputError(f"sample_data.video_seconds * video_fps: expected at least one frame, got {num_frames}")
    with output_lock("sample-data", output, lock_wait), atomic_dir(output) as tmp:
        mark(tmp, STAGE)
        ident = tmp / "identities" / IDENTITY_NAME
        ident.mkdir(parents=True)
        for src, dst in IDENTITY_PHOTOS.items():
            (ident / dst).write_bytes(photos[src])
        others = tmp / "others"
        others.mkdir()
        for src, dst in OTHER_PHOTOS.items():
            (others / dst).write_bytes(photos[src])
        extra = package_photos()
        for name, array in extra.items():
            Image.fromarray(array).save(others / f"{name}.png")
        people = tmp / "people"  # train-shared's people: the identity's photos, and three views of each other photo
        shutil.copytree(ident, people / IDENTITY_NAME)
        singles = {Path(f).stem: _decode(photos[f]) for f in OTHER_PHOTOS} | extra
        for name, array in sorted(singles.items()):
            (people / name).mkdir()
            for suffix, kind in PEOPLE_VIEWS:
                Image.fromarray(photo_view(array, kind)).save(people / name / f"{name}{suffix}.png")

        videos = tmp / "videos"
        videos.mkdir()
        captions = []
        sources = [VIDEO_SOURCES[i % len(VIDEO_SOURCES)] for i in range(cfg.num_videos)]
        for i, src in enumerate(progress(sources, desc="sample videos")):
            frames = dance_frames(_decode(photos[src]), num_frames, cfg.video_height, cfg.video_width, cfg.seed + i)
            name = f"dance_{i:02d}"
            write_video(videos / f"{name}.mp4", frames, fps=cfg.video_fps)
            who = "a man in a dark suit" if src.startswith(("obama", "biden")) else "a person"
            captions.append({"name": name, "caption": f"{who} dancing in a studio"})
        with open(videos / "captions.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["name", "caption"])
            writer.writeheader()
            writer.writerows(captions)
    summary = {
        "identity": IDENTITY_NAME,
        "identity_photos": len(IDENTITY_PHOTOS),
        "other_photos": len(OTHER_PHOTOS) + len(extra),
        "videos": cfg.num_videos,
        "frames_per_video": num_frames,
        "output": str(output),
    }
    print(
        f"sample-data: {summary['identity_photos']} photos of '{IDENTITY_NAME}', {summary['other_photos']} of others, "
        f"{cfg.num_videos} videos of {num_frames} frames ({cfg.video_height}x{cfg.video_width} @ {cfg.video_fps} fps) -> {output}"
    )
    return summary
