"""Wan2.1's shape rules, in one place: what a video must look like to go through the model.

The VAE compresses time 4x with the first frame kept (``F = 4n + 1``: 17, 33, 49, 81 ...) and
space 8x, and the transformer's patches are 2x2 latents: height and width are multiples of 16.
Config validation, prepare-pose, photos-as-examples, rendering and ``generate_video`` all ask here.
"""

from __future__ import annotations

from faceid.errors import InputError

FRAME_STEP = 4  # F = 4n + 1 (F = 1: a single image, which Wan takes too)
MIN_FRAMES = FRAME_STEP + 1  # a clip or a pose video: some motion
SIZE_MULTIPLE = 16


def valid_num_frames(num_frames: int, minimum: int = 1) -> bool:
    return num_frames >= minimum and (num_frames - 1) % FRAME_STEP == 0


def valid_side(pixels: int) -> bool:
    return pixels > 0 and pixels % SIZE_MULTIPLE == 0


def frames_to_keep(num_frames: int, policy: str, where: str = "pose video") -> int:
    """The frames of a video the model takes. ``fix``: the largest 4n+1 <= F (trailing frames
    dropped); ``reject``: :class:`InputError` unless F is already 4n+1."""
    if num_frames < MIN_FRAMES:
        raise InputError(f"{where}: {num_frames} frames; at least {MIN_FRAMES} (4n+1) are needed")
    keep = (num_frames - 1) // FRAME_STEP * FRAME_STEP + 1
    if keep != num_frames and policy == "reject":
        raise InputError(
            f"{where}: {num_frames} frames is not 4n+1 (e.g. {keep} or {keep + FRAME_STEP}); trim the video or set "
            "batch_infer.frame_count_policy=fix to drop the trailing frames"
        )
    return keep


def check_video_shape(num_frames: int, height: int, width: int, where: str) -> None:
    """:class:`InputError` unless F is 4n+1 and H, W are multiples of 16."""
    if not valid_num_frames(num_frames):
        raise InputError(f"{where}: Wan needs 4n+1 frames (17, 33, 81...), got {num_frames}")
    check_size(height, width, where)


# The largest frame a pose video may have: Wan2.1's largest training size, 720p (1280x720, either
# orientation); the 1.3B model was trained at 480p (832x480). Larger frames are outside what the model
# learned and cost memory quadratically in attention; refused, not resized (no silent change).
MAX_LONG_SIDE = 1280
MAX_PIXELS = 1280 * 720


def check_max_size(height: int, width: int, where: str) -> None:
    """:class:`InputError` when a frame is larger than the model takes (:data:`MAX_LONG_SIDE`, :data:`MAX_PIXELS`)."""
    if max(height, width) > MAX_LONG_SIDE or height * width > MAX_PIXELS:
        raise InputError(f"{where}: {height}x{width} (HxW) is larger than the model takes: at most {MAX_LONG_SIDE} px on "
                         f"the long side and {MAX_PIXELS} pixels (720x1280 / 1280x720, Wan2.1's largest training size). "
                         "Make it smaller first, e.g. with prepare-pose (its clips are prepare_pose.height x width, "
                         "480x832 on the wan2.1 profile)")


def check_size(height: int, width: int, where: str) -> None:
    """:class:`InputError` unless H and W are multiples of 16 (no silent resize)."""
    if not (valid_side(height) and valid_side(width)):
        raise InputError(f"{where}: {height}x{width}; height and width must be multiples of {SIZE_MULTIPLE} "
                         "(prepare-pose writes such clips, e.g. 480x832)")
