"""``faceid`` command line: one subcommand per stage, each a thin door into the library.

Stage names are the same at every layer: CLI ``crop-faces`` = DVC stage ``crop_faces`` =
KFP component ``crop_faces`` = module ``faceid.faces.crop``. Heavy imports happen inside the
handlers so ``faceid --help`` stays fast. This is the only place that reads the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from faceid.errors import ConfigError, FaceidError

# --------------------------------------------------------------------------- handlers
# Each handler: (params, args) -> None. Library functions do the work and print summaries.


def _cmd_sample_data(params, args) -> None:
    from faceid import sample_data

    sample_data.run(params.sample_data, Path(args.output), lock_wait=args.lock_wait)


def _cmd_crop_faces(params, args) -> None:
    from faceid.faces import crop

    run = crop.run_many if crop.holds_identities(Path(args.input)) else crop.run
    run(params.crop_faces, Path(args.input), Path(args.output), lock_wait=args.lock_wait)


def _cmd_embed_faces(params, args) -> None:
    from faceid.faces import embed

    run = embed.run_many if embed.holds_identities(Path(args.crops)) else embed.run
    run(params.embed_faces, Path(args.crops), Path(args.output), lock_wait=args.lock_wait)


def _cmd_similarity(params, args) -> None:
    from faceid.faces import similarity

    similarity.run(params, Path(args.reference), Path(args.video), Path(args.output) if args.output else None)


def _cmd_prepare_pose(params, args) -> None:
    import dataclasses

    from faceid.pose import prepare

    cfg = params.prepare_pose
    if args.workers is not None:
        if args.workers < 0:
            raise ConfigError(f"--workers: expected >= 0 (0 = one per CPU, 1 = in this process), got {args.workers}")
        cfg = dataclasses.replace(cfg, workers=args.workers)
    prepare.run(
        cfg,
        Path(args.videos),
        Path(args.pose_videos) if args.pose_videos else None,
        Path(args.output),
        captions=Path(args.captions) if args.captions else None,
        lock_wait=args.lock_wait,
        ray_address=_ray_address(params, args),
        num_cpus=params.ray.num_cpus,
    )


def _cmd_train_lora(params, args) -> None:
    from faceid.train import launch

    launch.run(
        params,
        identity=args.identity,
        crops_dir=Path(args.crops),
        embeddings_dir=Path(args.embeddings),
        clips_dir=Path(args.clips),
        output_dir=Path(args.output),
        ray_address=_ray_address(params, args),
        mlflow_uri=_mlflow_uri(params, args),
        lock_wait=args.lock_wait,
    )


def _cmd_render_validation(params, args) -> None:
    from faceid import validate

    validate.run(
        params,
        identity_dir=Path(args.identity),
        clips_dir=Path(args.clips),
        reference=Path(args.reference),
        output_dir=Path(args.output),
        mlflow_uri=_mlflow_uri(params, args),
        lock_wait=args.lock_wait,
    )


def _cmd_infer(params, args) -> None:
    from faceid import infer

    infer.infer_one(
        params,
        identity=args.identity,
        pose_video=Path(args.pose_video),
        output=Path(args.output),
        face_scale=args.face_scale,
        lora_scale=args.lora_scale,
        guidance_scale=args.cfg_scale,
        num_inference_steps=args.steps,
        seed=args.seed,
        prompt=args.prompt,
        blend=args.blend,
        reference_only=args.reference_only,
        reference_image=Path(args.reference_image) if args.reference_image else None,
        mlflow_uri=_mlflow_uri(params, args),
        lock_wait=args.lock_wait,
    )


def _cmd_batch_infer(params, args) -> None:
    from faceid import batch

    batch.run(
        params,
        identity=args.identity,
        pose_videos=Path(args.pose_videos),
        output_dir=Path(args.output),
        blend=args.blend,
        interpolate=args.interpolate,
        face_scale=args.face_scale,
        lora_scale=args.lora_scale,
        ray_address=_ray_address(params, args),
        mlflow_uri=_mlflow_uri(params, args),
        lock_wait=args.lock_wait,
    )


def _cmd_make_test_weights(params, args) -> None:
    from faceid.model import test_weights

    output = Path(args.output) if args.output else test_weights.default_output(args.size)
    test_weights.write_test_weights(output, args.size, params.model.tiny, seed=args.seed)


def _cmd_pipeline(params, args) -> None:
    from faceid import orchestrate

    if args.pipeline_command == "compile":
        orchestrate.compile_pipelines(Path(args.output_dir))
    elif args.pipeline_command == "run":
        if not args.local:
            raise FaceidError("faceid pipeline run: only --local is supported here; use `faceid pipeline submit --host URL` for a cluster")
        orchestrate.run_local(params, args.name, args.arguments or [], params_path=Path(args.params), mlflow_uri=_mlflow_uri(params, args))
    elif args.pipeline_command == "submit":
        orchestrate.submit(args.name, args.host, args.arguments or [], namespace=args.namespace, experiment=args.experiment)


# --------------------------------------------------------------------------- environment (entry point only)


def _mlflow_uri(params, args) -> str:
    """--mlflow-uri > $MLFLOW_TRACKING_URI > params.tracking.mlflow_uri > local sqlite store."""
    from faceid.tracking import local_store_uri

    uri = getattr(args, "mlflow_uri", None) or os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.mlflow_uri
    return uri or local_store_uri(Path(params.tracking.local_store))


def _ray_address(params, args) -> str:
    return getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS") or params.ray.address


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from faceid import __version__

    parser = argparse.ArgumentParser(prog="faceid", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"faceid {__version__}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set train_lora.stage1.steps=5 (repeatable)")
    parser.add_argument("--lock-wait", type=float, default=0.0, metavar="SECONDS",
                        help="when another run is writing the same output, wait up to SECONDS for it "
                             "(default 0: fail at once; -1: wait as long as it takes)")
    sub = parser.add_subparsers(dest="command", metavar="STAGE", required=True)

    def add(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("sample-data", _cmd_sample_data, "write the sample identity (real photos) and sample dance videos")
    p.add_argument("--output", default="data/sample")

    p = add("crop-faces", _cmd_crop_faces, "detect, align, quality-filter and crop reference face photos")
    p.add_argument("--input", required=True,
                   help="folder of photos of one person; or a folder of such folders and no photos (many identities "
                        "as one job, models loaded once): each is cropped into OUTPUT/<folder name>/, and an identity "
                        "that fails leaves its output as it was while the others go on (exit 2 at the end)")
    p.add_argument("--output", required=True)

    p = add("embed-faces", _cmd_embed_faces, "embed face crops; identity embedding and outlier report")
    p.add_argument("--crops", required=True,
                   help="output folder of crop-faces; or a folder of them (crop-faces run on a folder of identities): "
                        "each is embedded into OUTPUT/<folder name>/, embedder loaded once")
    p.add_argument("--output", required=True)

    p = add("similarity", _cmd_similarity, "FaceSim: per-frame identity similarity of a video to a reference")
    p.add_argument("--reference", required=True, help="embed-faces output folder or identity .safetensors")
    p.add_argument("--video", required=True, help="video file or folder of videos")
    p.add_argument("--output", help="JSON report path (default: print)")

    p = add("prepare-pose", _cmd_prepare_pose, "dance videos -> normalised clips + VACE pose-control videos")
    p.add_argument("--videos", required=True, help="folder of dance videos")
    p.add_argument("--pose-videos", help="folder of pre-rendered *_pose.mp4 videos (optional)")
    p.add_argument("--captions", help="captions.csv (name,caption); default: <name>.txt sidecars or the default prompt")
    p.add_argument("--output", required=True)
    p.add_argument("--workers", type=int, help="clip makers (default prepare_pose.workers): 0 = one per CPU on Ray, "
                   "1 = in this process without Ray")
    p.add_argument("--ray-address", help="Ray cluster address (default: local Ray)")

    mlflow_help = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local store)"
    for name in ("train-lora", "train"):
        p = add(name, _cmd_train_lora, "two-stage identity training (face mapper, then mapper + LoRA) on Ray Train"
                + (" (alias of train-lora)" if name == "train" else ""))
        p.add_argument("--identity", required=True, help="identity name (MLflow model faceid-<name>)")
        p.add_argument("--crops", required=True, help="crop-faces output folder (the photos are training targets)")
        p.add_argument("--embeddings", required=True, help="embed-faces output folder")
        p.add_argument("--clips", required=True, help="prepare-pose output folder")
        p.add_argument("--output", required=True, help="identity folder to write")
        p.add_argument("--ray-address", help="Ray cluster address (default: local Ray)")
        p.add_argument("--mlflow-uri", help=mlflow_help)

    p = add("render-validation", _cmd_render_validation, "render held-out clips, compute FaceSim/pose metrics, gate the alias")
    p.add_argument("--identity", required=True, help="identity folder from train-lora")
    p.add_argument("--clips", required=True, help="prepare-pose output folder")
    p.add_argument("--reference", required=True, help="embed-faces output folder")
    p.add_argument("--output", required=True)
    p.add_argument("--mlflow-uri", help=mlflow_help)

    face_scale_help = "identity strength, >= 0: scales face tokens and LoRA; 0 = the base model (default batch_infer.face_scale)"
    lora_scale_help = "scales the LoRA alone, >= 0 (default batch_infer.lora_scale)"
    p = add("infer", _cmd_infer, "generate one video for an identity and a pose video")
    p.add_argument("--identity", help="identity folder or models:/faceid-<name>@<alias>")
    p.add_argument("--pose-video", required=True)
    p.add_argument("--output", required=True, help="output .mp4")
    p.add_argument("--face-scale", type=float, help=face_scale_help)
    p.add_argument("--lora-scale", type=float, help=lora_scale_help)
    p.add_argument("--reference-only", action="store_true",
                   help="training-free baseline: base VACE with a reference image, no adapter, no face tokens")
    p.add_argument("--reference-image", help="photo for --reference-only (an aligned face crop works best); "
                                             "default: the --identity folder's reference.png")
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--prompt")
    p.add_argument("--blend", help="mix identities: a=0.7,b=0.3 (names are identity folders or models:/ URIs)")
    p.add_argument("--mlflow-uri", help=mlflow_help)

    p = add("batch-infer", _cmd_batch_infer, "generate videos for a folder/manifest of pose videos with Ray Data")
    p.add_argument("--identity", required=True, help="identity folder or models:/faceid-<name>@<alias>")
    p.add_argument("--pose-videos", required=True, help="folder of pose videos or a prepare-pose output folder")
    p.add_argument("--output", required=True)
    p.add_argument("--blend", help="mix identities: a=0.7,b=0.3")
    p.add_argument("--interpolate", help="A,B: a sequence from identity A to B (batch_infer.interpolation_steps)")
    p.add_argument("--face-scale", type=float, help=face_scale_help)
    p.add_argument("--lora-scale", type=float, help=lora_scale_help)
    p.add_argument("--ray-address", help="Ray cluster address (default: local Ray)")
    p.add_argument("--mlflow-uri", help=mlflow_help)

    p = add("make-test-weights", _cmd_make_test_weights,
            "write RANDOM test weights with the Wan2.1-VACE-1.3B folder layout (they draw noise; offline checks only)")
    p.add_argument("--output", help="folder to write (default: .cache/test-weights/<size>)")
    p.add_argument("--size", choices=["real", "tiny"], default="real",
                   help="real: the 1.3B transformer/VAE configs (4.6 GB); tiny: params.yaml model.tiny (CI)")
    p.add_argument("--seed", type=int, default=0)

    p = add("pipeline", _cmd_pipeline, "compile, run locally or submit the KFP pipelines (train, infer)")
    psub = p.add_subparsers(dest="pipeline_command", required=True)
    pc = psub.add_parser("compile", help="write the IR YAML of both pipelines")
    pc.add_argument("--output-dir", default="pipelines/compiled")
    pr = psub.add_parser("run", help="run a pipeline with KFP's local runner")
    pr.add_argument("name", choices=["train", "infer"])
    pr.add_argument("--local", action="store_true", help="KFP SubprocessRunner: no cluster, no Docker")
    pr.add_argument("--arg", dest="arguments", action="append", metavar="NAME=VALUE", help="pipeline parameter")
    pr.add_argument("--mlflow-uri", help=mlflow_help)
    ps = psub.add_parser("submit", help="submit a pipeline run to a Kubeflow Pipelines endpoint")
    ps.add_argument("name", choices=["train", "infer"])
    ps.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    ps.add_argument("--namespace", default=None)
    ps.add_argument("--experiment", default="faceid")
    ps.add_argument("--arg", dest="arguments", action="append", metavar="NAME=VALUE", help="pipeline parameter")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from faceid.config import load_params

        params = load_params(args.params, args.overrides)
        args.handler(params, args)
    except FaceidError as exc:
        print(f"faceid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"faceid {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
