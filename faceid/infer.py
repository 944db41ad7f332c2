"""``faceid infer`` (the stage): one pose video + a trained identity (or a blend) -> one generated video.

Rendering itself (settings, identities from folders or the registry, the pipeline, writing the
video) is :mod:`faceid.render`; this module checks the inputs of one command and runs it.
"""

from __future__ import annotations

import time
from pathlib import Path

from faceid.errors import InputError
from faceid.render import Generator, Settings, load_identities, load_pose_video, parse_blend, reference_image_for, render_one


def run(
    params,
    pose_video: Path,
    output: Path,
    settings: Settings,
    identity: str | Path | None = None,
    blend: str | None = None,
    reference_only: bool = False,
    reference_image: str | Path | None = None,
    mlflow_uri: str | None = None,
    lock_wait: float = 0.0,
    adapter: str | Path | None = None,
) -> dict:
    """Generate ``output`` (MP4, the pose video's frame count/size/fps) for ``identity`` (a folder
    or ``models:/`` URI) or a ``blend`` (``a=0.7,b=0.3``, which replaces ``identity``), rendered with
    ``settings`` (:func:`faceid.render.settings_from`, built at the door).

    ``reference_only``: the training-free baseline, base VACE R2V with no adapter and no face
    tokens (``settings.face_scale`` / ``lora_scale`` do not apply); the reference image is
    ``reference_image`` (a photo) or the identity's reference.png. Every input is checked before the
    model is built. ``lock_wait``: seconds to wait for another run writing ``output``
    (:func:`faceid.io.output_lock`). ``adapter``: a shared adapter (``train-shared``); ``identity`` /
    the blend's names are then people's embed-faces outputs, rendered with no training (zero-shot), and
    ``reference_image`` is the person's reference image when the adapter was trained with one."""
    from faceid.io import output_lock
    from faceid.outputs import check_file, is_mp4

    # 1. Check inputs before building the model: output, identities (folders or registry names,
    #    checked against the base model), the pose video (trimmed to 4n+1: said, not silent)
    output = Path(output)
    if output.suffix.lower() != ".mp4":
        raise InputError(f"{output}: the output must be an .mp4 file")
    # faceid.outputs: not a folder, not an input, and an existing file only if it is a video (an earlier render)
    blended = [ref for ref, _ in parse_blend(blend)] if blend else []
    check_file("infer", output, [pose_video, reference_image, identity, *blended, adapter], replaceable=is_mp4,
               what="an MP4 video")
    reference = person_reference = None
    if adapter and reference_only:
        raise InputError("--reference-only uses no identity adapter: --adapter cannot be combined with it")
    if adapter and reference_image is not None:  # the zero-shot person's own reference image
        from faceid.render import read_reference_photo

        person_reference, reference_image = read_reference_photo(reference_image, params.crop_faces), None
    if reference_only:
        if blend:
            raise InputError("--reference-only uses no identity adapter: --blend cannot be combined with it")
        reference, reference_source = reference_image_for(identity, reference_image, mlflow_uri,
                                                          params.tracking.download_dir, params.crop_faces)
    elif reference_image is not None:
        raise InputError("--reference-image is the photo of --reference-only (an identity brings its own reference)")
    pairs = parse_blend(blend) if blend else None
    refs = [] if reference_only else [ref for ref, _ in pairs] if pairs else [identity] if identity else []
    if not reference_only and not refs:
        raise InputError("infer: expected --identity, --blend or --reference-only")
    identities = load_identities(refs, params, mlflow_uri, adapter=adapter, reference=person_reference)
    t0 = time.perf_counter()
    pose = load_pose_video(pose_video, params.batch_infer.frame_count_policy)
    load_s = time.perf_counter() - t0
    info = pose[2]
    if info["trimmed_frames"]:
        print(f"faceid infer: {pose_video}: {info['source_frames']} frames trimmed to {len(pose[0])} (Wan needs 4n+1; "
              f"batch_infer.frame_count_policy=fix drops the last {info['trimmed_frames']}, =reject refuses)")

    with output_lock("infer", output, lock_wait):
        # 2. Model and identity (loaded in step 1); none for --reference-only
        t0 = time.perf_counter()
        generator = Generator(params, mlflow_uri=mlflow_uri, identities=identities, adapter=adapter)
        conditioning = None if reference_only else generator.conditioning(identity, pairs)
        if conditioning is not None and not pairs:  # model.compile: one identity's LoRA fused (faceid.render)
            generator.fuse_identity(identity, settings)
        setup_s = time.perf_counter() - t0

        # 3. Generate and write (the pose video read in step 1)
        row = render_one(generator, conditioning, Path(pose_video), output, settings, pose=pose, reference_image=reference)
    row.update(load_s=round(load_s, 4), setup_s=round(setup_s, 4))
    if reference_only:
        row.update(identity="reference-only", reference_source=reference_source)
    who = f"reference-only ({reference_source})" if reference_only else f"identity {row['identity']}"
    print(f"faceid infer: wrote {output} ({row['num_frames']} frames {row['height']}x{row['width']} @ {row['fps']:g} fps, "
          f"{who}, {row['generate_s']:.1f} s" + (f", of which torch.compile {row['compile_s']:.1f} s" if row["compile_s"] is not None
                                                  else "") + ")")
    return row
