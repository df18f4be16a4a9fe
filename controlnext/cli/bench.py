"""`controlnext bench`: parameters, inference overhead, training cost and convergence of ControlNeXt and ControlNet."""

from __future__ import annotations

DESCRIPTION = """Measure ControlNeXt against ControlNet on this machine and write BENCHMARKS.md (tables, plots)
and BENCHMARKS.json. Without --convergence: parameter counts (SD1.5, SDXL), the overhead of one denoising
step, the cost of one training step (SD1.5 architecture, random weights) and the whole generation time of
the embedded default model. With --convergence: train both methods on the shapes world and compare
fidelity against steps (longer). With --convergence-study: the same under several recipes, training seeds
and condition kinds, reported as medians and ranges over the seeds (hours on a CPU; a rerun resumes)."""


def add_parser(subparsers, parent) -> None:
    parser = subparsers.add_parser("bench", parents=[parent], description=DESCRIPTION,
                                   help="measure ControlNeXt against ControlNet and write BENCHMARKS.md")
    parser.add_argument("--resolution", type=int, nargs="*", default=[256],
                        help="image sizes in pixels to time a denoising step at (multiples of 64); none: skip "
                        "(default: 256)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per resolution (default: 6 at 256 px, 3 at 512 px)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (with --convergence-study: of each run; default: 1)")
    parser.add_argument("--training-resolution", type=int, default=256,
                        help="image size of the training-cost measure (0: skip it; default: 256)")
    parser.add_argument("--training-steps", type=int, default=3, help="timed training steps per method (default: 3)")
    parser.add_argument("--no-generation", dest="generation", action="store_false",
                        help="skip timing a whole generation of the embedded default model")
    video = parser.add_argument_group("video (--video)")
    video.add_argument("--video", action="store_true", help="the cost of pose control on a Stable Video Diffusion "
                       "step instead: FLOPs at 576x1024 (meta device) and CPU time at a size that fits")
    video.add_argument("--video-frames", type=int, default=14, help="frames in a window (default: 14)")
    video.add_argument("--video-time-size", default="64x112", metavar="HxW",
                       help="size of the CPU timing, which needs the 1.5B-parameter UNet in memory (default: 64x112)")
    parser.add_argument("--sd3-cpu", action="store_true",
                        help="only time SD3-medium's transformer step and each control model alone on the CPU "
                        "(its width with 6 of its joint blocks, random bf16 weights, 256 px; about 1.5 GB of memory)")
    group = parser.add_argument_group("convergence (--convergence)")
    group.add_argument("--convergence", action="store_true",
                       help="train ControlNeXt and ControlNet on the shapes world and compare fidelity against steps")
    group.add_argument("--kind", nargs="+", default=None,
                       help="condition kinds to compare on: canny, outline or mask (default: canny; with "
                       "--convergence-study: canny and mask)")
    group.add_argument("--base", default=None, help="base model (default: the embedded default model)")
    group.add_argument("--steps", type=int, default=None, help="training steps of each run (default: 600)")
    group.add_argument("--validate-every", type=int, default=None, help="steps between validations (default: 25)")
    group.add_argument("--batch-size", type=int, default=None, help="examples per step (default: 16)")
    group.add_argument("--learning-rate", type=float, default=None,
                       help="ControlNet's rate and ControlNeXt's UNet weights' rate (default: 1e-4)")
    group.add_argument("--module-learning-rate", type=float, default=None,
                       help="ControlNeXt's module rate (default: 1e-3)")
    group.add_argument("--module-config", default=None, help="ControlNeXt module sizes as JSON")
    group.add_argument("--validation-count", type=int, default=None, help="held-out scenes to score (default: 16)")
    group.add_argument("--sampling-steps", type=int, default=None,
                       help="DDIM steps of each validation image (default: 20)")
    group.add_argument("--work-dir", default=None, help="where the trained controls and logs go (default: "
                       "runs/convergence; with --convergence-study: runs/convergence-study)")
    study = parser.add_argument_group("convergence study (--convergence-study; with the convergence flags above "
                                      "but the learning rates, which --recipes sets)")
    study.add_argument("--convergence-study", action="store_true",
                       help="train both methods under each recipe with each training seed on each kind and report "
                       "medians and ranges over the seeds; runs finished before with the same settings are kept")
    study.add_argument("--recipes", nargs="+", default=None,
                       help="learning-rate recipes: paper (each paper's own rates), common (1e-3 for every "
                       "trainable weight) (default: paper common)")
    study.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds (default: 0 1 2)")
    study.add_argument("--examples", type=int, default=None,
                       help="training scenes every run draws from: the first N of the train split (default: 4000)")
    study.add_argument("--no-latent-cache", dest="latent_cache", action="store_false",
                       help="encode each scene every time it is drawn instead of once for all runs")
    study.add_argument("--jobs", type=int, default=1,
                       help="runs trained at once, each in its own process with --threads threads (default: 1)")
    parser.add_argument("--results", default="BENCHMARKS.json",
                        help="JSON file the results are merged into (default: BENCHMARKS.json)")
    parser.add_argument("--output", default="BENCHMARKS.md", help="report written from all results (default: BENCHMARKS.md)")
    parser.set_defaults(run=run)


CONVERGENCE_FLAGS = ("base", "steps", "validate_every", "batch_size", "learning_rate", "module_learning_rate",
                     "module_config", "validation_count", "sampling_steps")
STUDY_FLAGS = ("base", "steps", "validate_every", "batch_size", "module_config", "validation_count", "sampling_steps",
               "examples")


def run(args) -> int:
    from ..errors import ControlNextError

    if args.threads is not None and args.threads <= 0:
        raise ControlNextError(f"--threads must be positive, not {args.threads}")
    if not getattr(args, "debug", False):
        from . import quiet_loading_bars

        quiet_loading_bars()
    if args.video:
        from ..bench.suite import run_video_benchmark

        height, _, width = args.video_time_size.lower().partition("x")
        if not (height.isdigit() and width.isdigit() and int(height) % 8 == 0 and int(width) % 8 == 0):
            raise ControlNextError(f"--video-time-size {args.video_time_size!r} must be HxW, multiples of 8")
        if args.video_frames < 1:
            raise ControlNextError(f"--video-frames must be positive, not {args.video_frames}")
        run_video_benchmark(args.video_frames, (int(height), int(width)), rounds=args.rounds or 2,
                            threads=args.threads, results_path=args.results, output_path=args.output)
        return 0
    if args.sd3_cpu:
        from ..bench.suite import run_sd3_cpu_benchmark

        run_sd3_cpu_benchmark(args.results, args.output, threads=args.threads or 1)
        print(f"wrote {args.output} and {args.results}")
        return 0
    if args.convergence_study:
        return run_study(args)
    if args.convergence:
        import torch

        from ..bench.convergence import ConvergenceSetup
        from ..bench.suite import run_convergence_benchmark

        if args.threads:
            torch.set_num_threads(args.threads)
        given = {name: getattr(args, name) for name in CONVERGENCE_FLAGS if getattr(args, name) is not None}
        for name in ("steps", "validate_every", "batch_size", "validation_count", "sampling_steps"):
            if name in given and given[name] <= 0:
                raise ControlNextError(f"--{name.replace('_', '-')} must be positive, not {given[name]}")
        setups = [ConvergenceSetup(kind=kind, **given) for kind in args.kind or ["canny"]]
        _ = [setup.metric for setup in setups]  # refuses an unknown kind before any training
        for setup in setups:
            kind = setup.kind
            result = run_convergence_benchmark(setup, args.work_dir or "runs/convergence", args.results, args.output)
            speedup = result.get("speedup_to_90")
            print(f"{kind}: ControlNeXt reaches 90% of its final fidelity "
                  + (f"{speedup:.1f}x sooner than ControlNet" if speedup else "(no comparison)"))
    else:
        from ..bench.suite import run_benchmarks

        run_benchmarks(args.resolution, rounds=args.rounds, warmup=args.warmup, threads=args.threads,
                       results_path=args.results, output_path=args.output,
                       training_resolution=args.training_resolution, training_steps=args.training_steps,
                       generation=args.generation)
    print(f"wrote {args.output} and {args.results}")
    return 0


def study_from_args(args):
    """The ConvergenceStudy the flags ask for (defaults where a flag is absent), checked."""
    from ..bench.convergence import ConvergenceStudy
    from ..errors import ControlNextError

    for name in ("learning_rate", "module_learning_rate"):
        if getattr(args, name) is not None:
            raise ControlNextError(f"--{name.replace('_', '-')} applies to --convergence; the study's rates come "
                                   "from --recipes")
    given = {name: getattr(args, name) for name in STUDY_FLAGS if getattr(args, name) is not None}
    lists = {"kinds": args.kind, "recipes": args.recipes, "seeds": args.seeds}
    given.update({name: tuple(values) for name, values in lists.items() if values is not None})
    return ConvergenceStudy(**given, jobs=args.jobs, threads=args.threads, latent_cache=args.latent_cache).check()


def run_study(args) -> int:
    """--convergence-study: train the runs not finished before, aggregate, plot, merge and write the report."""
    import torch

    from ..bench.suite import run_convergence_study_benchmark

    study = study_from_args(args)
    torch.set_num_threads(study.threads)  # the floors here; each run sets its own
    result = run_convergence_study_benchmark(study, args.work_dir or "runs/convergence-study", args.results,
                                             args.output)
    for kind in result["kinds"].values():
        for recipe in kind["recipes"].values():
            print(recipe["sentence"])
    print(f"wrote {args.output} and {args.results}")
    return 0
