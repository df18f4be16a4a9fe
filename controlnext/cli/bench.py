"""`controlnext bench`: parameter counts and the inference overhead of ControlNeXt and ControlNet."""

from __future__ import annotations


def add_parser(subparsers, parent) -> None:
    parser = subparsers.add_parser(
        "bench", parents=[parent],
        help="count parameters and time a denoising step with and without control (SD1.5 architecture, CPU)",
    )
    parser.add_argument("--resolution", type=int, nargs="*", default=[256],
                        help="image sizes in pixels to time (multiples of 64); none: parameters only (default: 256)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per resolution (default: 6 at 256 px, 3 at 512 px)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--results", default="BENCHMARKS.json",
                        help="JSON file the results are merged into, one entry per resolution (default: BENCHMARKS.json)")
    parser.add_argument("--output", default="BENCHMARKS.md", help="report written from all results (default: BENCHMARKS.md)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..bench.suite import run_benchmarks

    run_benchmarks(args.resolution, rounds=args.rounds, warmup=args.warmup, threads=args.threads,
                   results_path=args.results, output_path=args.output)
    print(f"wrote {args.output} and {args.results}")
    return 0
