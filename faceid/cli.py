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

from faceid.errors import FaceidError, InputError, Terminated

# --------------------------------------------------------------------------- handlers
# Each handler: (params, args) -> None: the flags become one typed call of faceid.stages (the
# stage's name), with the environment read here (MLflow URI, Ray address). Stages print summaries.


def _cmd_sample_data(params, args) -> None:
    from faceid import stages

    stages.sample_data(params, Path(args.output), lock_wait=args.lock_wait)


def _cmd_crop_faces(params, args) -> None:
    from faceid import stages

    stages.crop_faces(params, Path(args.input), Path(args.output), lock_wait=args.lock_wait)


def _cmd_embed_faces(params, args) -> None:
    from faceid import stages

    stages.embed_faces(params, Path(args.crops), Path(args.output), lock_wait=args.lock_wait)


def _cmd_similarity(params, args) -> None:
    from faceid import stages

    stages.similarity(params, Path(args.reference), Path(args.video), Path(args.output) if args.output else None)


def _cmd_prepare_pose(params, args) -> None:
    from faceid import stages
    from faceid.config import with_values

    if args.workers is not None:
        params = with_values(params, {"prepare_pose.workers": args.workers}, flags={"prepare_pose.workers": "--workers"})
    stages.prepare_pose(params, Path(args.videos), Path(args.output),
                        pose_videos=Path(args.pose_videos) if args.pose_videos else None,
                        captions=Path(args.captions) if args.captions else None,
                        ray_address=_ray_address(params, args), lock_wait=args.lock_wait)


def _cmd_train_lora(params, args) -> None:
    from faceid import stages

    if args.plan:  # print what the run would do: no model, no Ray, no MLflow, nothing written
        stages.train_lora(params, args.identity, Path(args.crops), Path(args.embeddings), Path(args.clips),
                          Path(args.output), plan=True, init_from=args.init_from,
                          mlflow_uri=_mlflow_uri(params, args) if args.init_from else "")  # a models:/ adapter only
        return
    stages.train_lora(params, args.identity, Path(args.crops), Path(args.embeddings), Path(args.clips), Path(args.output),
                      ray_address=_ray_address(params, args), mlflow_uri=_mlflow_uri(params, args),
                      lock_wait=args.lock_wait, origin=_origin("train-lora"), init_from=args.init_from)


def _cmd_train_shared(params, args) -> None:
    from faceid import stages

    stages.train_shared(params, Path(args.crops), Path(args.embeddings), Path(args.clips), Path(args.output),
                        ray_address=_ray_address(params, args), mlflow_uri=_mlflow_uri(params, args),
                        lock_wait=args.lock_wait, plan=args.plan, origin=_origin("train-shared"))


def _cmd_render_validation(params, args) -> None:
    from faceid import stages

    stages.render_validation(params, Path(args.identity) if args.identity else None, Path(args.clips),
                             Path(args.reference), Path(args.output), mlflow_uri=_mlflow_uri(params, args),
                             lock_wait=args.lock_wait, origin=_origin("render-validation"), adapter=args.adapter)


def _cmd_infer(params, args) -> None:
    from faceid import stages
    from faceid.render import settings_from

    if args.reference_only:
        given = [flag for flag, value in (("--face-scale", args.face_scale), ("--lora-scale", args.lora_scale))
                 if value is not None]
        if given:
            raise InputError(f"--reference-only uses no identity adapter: {', '.join(given)} cannot be combined with it")
    settings = settings_from(params.batch_infer, face_scale=args.face_scale, lora_scale=args.lora_scale,
                             guidance_scale=args.guidance_scale, num_inference_steps=args.steps, seed=args.seed,
                             prompt=args.prompt)
    stages.infer(params, Path(args.pose_video), Path(args.output), settings, identity=args.identity, blend=args.blend,
                 reference_only=args.reference_only,
                 reference_image=Path(args.reference_image) if args.reference_image else None,
                 mlflow_uri=_mlflow_uri(params, args), lock_wait=args.lock_wait, adapter=args.adapter)


def _cmd_batch_infer(params, args) -> None:
    from faceid import stages
    from faceid.render import settings_from

    settings = settings_from(params.batch_infer, face_scale=args.face_scale, lora_scale=args.lora_scale)
    stages.batch_infer(params, Path(args.pose_videos), Path(args.output), settings, identity=args.identity,
                       blend=args.blend, interpolate=args.interpolate, ray_address=_ray_address(params, args),
                       mlflow_uri=_mlflow_uri(params, args), lock_wait=args.lock_wait, adapter=args.adapter)


def _cmd_make_test_weights(params, args) -> None:
    from faceid import stages

    stages.make_test_weights(params, Path(args.output) if args.output else None, args.size, seed=args.seed,
                             text_encoder=args.text_encoder)


def _cmd_pipeline(params, args) -> None:
    # a door to the other doors: the KFP pipelines and their runner live in pipelines/ (faceid_pipelines)
    from faceid_pipelines import runner

    if args.pipeline_command == "compile":
        runner.compile_pipelines(Path(args.output_dir))
    elif args.pipeline_command == "run":
        if not args.local:
            raise FaceidError("faceid pipeline run: only --local is supported here; use `faceid pipeline submit --host URL` for a cluster")
        runner.run_local(params, args.name, args.arguments or [], params_path=Path(args.params),
                         mlflow_uri=_mlflow_uri(params, args), verbose=args.verbose)
    elif args.pipeline_command == "submit":
        runner.submit(args.name, args.host, args.arguments or [], namespace=args.namespace, experiment=args.experiment)


# --------------------------------------------------------------------------- environment (entry point only)


def _mlflow_uri(params, args) -> str:
    from faceid.tracking import resolve_uri

    return resolve_uri(getattr(args, "mlflow_uri", None), params.tracking, os.environ)


def _origin(command: str) -> dict:
    """Where this command runs, for its MLflow run's tags: the command, and the DVC stage when
    ``dvc repro`` runs it (DVC sets ``$DVC_STAGE``)."""
    return {"source": f"faceid {command}", "dvc_stage": os.environ.get("DVC_STAGE", "")}


def _ray_address(params, args) -> str:
    from faceid.ray_session import resolve_address

    return resolve_address(getattr(args, "ray_address", None), params.ray, os.environ)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from faceid import __version__

    parser = argparse.ArgumentParser(prog="faceid", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"faceid {__version__}")
    parser.add_argument("--params", help="params file (default: $FACEID_PARAMS, else params.yaml)")
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
    p.add_argument("--workers", type=int, help="clip makers (default prepare_pose.workers): 0 = one per CPU (on Ray, or "
                   "worker processes on a machine of <= 2 cores), 1 = in this process without Ray")
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
        p.add_argument("--plan", action="store_true",
                       help="print what the run would do (examples, face-size coverage, steps and passes per photo, "
                            "estimated time and memory, warnings) and exit: loads no diffusion model, writes nothing")
        p.add_argument("--init-from", help="start mapper and LoRA from a shared adapter (train-shared output folder or "
                                           "models:/faceid-<name>@<alias>); trains train_lora.init_from_share of the steps")

    p = add("train-shared", _cmd_train_shared, "one identity adapter for many people (zero-shot rendering, a start "
                                                "for train-lora --init-from), the train-lora recipe on Ray Train")
    p.add_argument("--crops", required=True, help="crop-faces output of a folder of people (<crops>/<person>/)")
    p.add_argument("--embeddings", required=True, help="embed-faces output of it (<embeddings>/<person>/)")
    p.add_argument("--clips", required=True, help="prepare-pose output folder")
    p.add_argument("--output", required=True, help="adapter folder to write")
    p.add_argument("--ray-address", help="Ray cluster address (default: local Ray)")
    p.add_argument("--mlflow-uri", help=mlflow_help)
    p.add_argument("--plan", action="store_true", help="print the plan (people, held out, clips per person, steps) and exit")

    p = add("render-validation", _cmd_render_validation, "render held-out clips, compute FaceSim/pose metrics, gate the alias")
    p.add_argument("--identity", help="identity folder from train-lora (the identity arm; the gate judges it)")
    p.add_argument("--adapter", help="a shared adapter (train-shared output folder or models:/faceid-<name>@<alias>): "
                                     "the zero_shot arm; without --identity the gate judges it")
    p.add_argument("--clips", required=True, help="prepare-pose output folder")
    p.add_argument("--reference", required=True, help="embed-faces output folder of the person; with --adapter also "
                                                      "that of a folder of people (the adapter's held-out people)")
    p.add_argument("--output", required=True)
    p.add_argument("--mlflow-uri", help=mlflow_help)

    face_scale_help = "identity strength, >= 0: scales face tokens and LoRA; 0 = the base model (default batch_infer.face_scale)"
    lora_scale_help = "scales the LoRA alone, >= 0 (default batch_infer.lora_scale)"
    adapter_help = ("a shared adapter (train-shared output folder or models:/faceid-<name>@<alias>): --identity, --blend "
                    "and --interpolate then name people's embed-faces output folders, rendered with no training")
    p = add("infer", _cmd_infer, "generate one video for an identity and a pose video")
    p.add_argument("--identity", help="identity folder or models:/faceid-<name>@<alias>")
    p.add_argument("--pose-video", required=True)
    p.add_argument("--output", required=True, help="output .mp4")
    p.add_argument("--face-scale", type=float, help=face_scale_help)
    p.add_argument("--lora-scale", type=float, help=lora_scale_help)
    p.add_argument("--reference-only", action="store_true",
                   help="training-free baseline: base VACE with a reference image, no adapter, no face tokens")
    p.add_argument("--reference-image", help="photo for --reference-only (an aligned face crop works best); "
                                             "default: the --identity folder's reference.png. With --adapter: the "
                                             "person's reference, when the adapter was trained with one")
    p.add_argument("--guidance-scale", "--cfg-scale", dest="guidance_scale", type=float,
                   help="classifier-free guidance, >= 1 (default batch_infer.guidance_scale; --cfg-scale: old name)")
    p.add_argument("--steps", type=int, help="denoising steps (default batch_infer.num_inference_steps)")
    p.add_argument("--seed", type=int, help="noise seed (default batch_infer.seed)")
    p.add_argument("--prompt", help="text prompt (default batch_infer.prompt, else the default caption)")
    p.add_argument("--blend", help="mix identities: a=0.7,b=0.3 (names are identity folders or models:/ URIs)")
    p.add_argument("--adapter", help=adapter_help)
    p.add_argument("--mlflow-uri", help=mlflow_help)

    p = add("batch-infer", _cmd_batch_infer, "generate videos for a folder/manifest of pose videos with Ray Data")
    p.add_argument("--identity", required=True, help="identity folder or models:/faceid-<name>@<alias>")
    p.add_argument("--pose-videos", required=True, help="folder of pose videos or a prepare-pose output folder")
    p.add_argument("--output", required=True)
    p.add_argument("--blend", help="mix identities: a=0.7,b=0.3")
    p.add_argument("--interpolate", help="A,B: a sequence from identity A to B (batch_infer.interpolation_steps)")
    p.add_argument("--adapter", help=adapter_help)
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
    p.add_argument("--text-encoder", choices=["test", "umt5-xxl"], default="test",
                   help="--size real: test = 2-layer UMT5 (114 MB); umt5-xxl = full UMT5-XXL size (11.4 GB bf16, GPU memory checks)")

    p = add("pipeline", _cmd_pipeline, "compile, run locally or submit the KFP pipelines (train, train-shared, infer)")
    psub = p.add_subparsers(dest="pipeline_command", required=True)
    pc = psub.add_parser("compile", help="write the IR YAML of every pipeline")
    pc.add_argument("--output-dir", default="pipelines/compiled")
    pr = psub.add_parser("run", help="run a pipeline with KFP's local runner")
    pr.add_argument("name", choices=["train", "train-shared", "infer"])
    pr.add_argument("--local", action="store_true", help="KFP SubprocessRunner: no cluster, no Docker")
    pr.add_argument("--arg", dest="arguments", action="append", metavar="NAME=VALUE", help="pipeline parameter")
    pr.add_argument("--mlflow-uri", help=mlflow_help)
    pr.add_argument("-v", "--verbose", action="store_true", help="show every task's own output (KFP executor, Ray)")
    ps = psub.add_parser("submit", help="submit a pipeline run to a Kubeflow Pipelines endpoint")
    ps.add_argument("name", choices=["train", "train-shared", "infer"])
    ps.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    ps.add_argument("--namespace", default=None)
    ps.add_argument("--experiment", default="faceid")
    ps.add_argument("--arg", dest="arguments", action="append", metavar="NAME=VALUE", help="pipeline parameter")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A FaceidError is one line and exit 2; Ctrl-C (SIGINT) and SIGTERM stop
    the run cleanly (``finally`` blocks run: a local Ray is stopped, locks released, temporary
    folders removed; outputs are replaced atomically, so nothing is half-written): one line, exit
    130 / 143 (128 + the signal), no traceback."""
    import signal
    import threading

    parser = build_parser()
    args = parser.parse_args(argv)
    received: list[int] = []  # the signal that stopped the run (libraries may re-raise a plain KeyboardInterrupt)

    def terminated(signum, frame) -> None:
        received.append(signum)
        raise Terminated(signum)

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, terminated) if main_thread else None
    try:
        from faceid.config import default_params_path, load_params

        args.params = args.params or str(default_params_path(os.environ))
        params = load_params(args.params, args.overrides)
        args.handler(params, args)
    except FaceidError as exc:
        print(f"faceid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Terminated) else received[0] if received else signal.SIGINT
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"faceid {args.command}: {what}; rerun the same command to resume (finished work is kept)",
              file=sys.stderr)
        return 128 + signum
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
