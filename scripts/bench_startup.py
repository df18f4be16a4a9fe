"""Print how long `controlnext` commands take to start and answer, each in a fresh process.

    python scripts/bench_startup.py [--rounds 5] [--image photo.png]

For each command: the median and the spread of the wall-clock seconds of `python -m controlnext ...`
over `--rounds` runs, and the heavy libraries the command imported. `annotate` and bad input of every
subcommand should answer in a fraction of a second; only work that needs models imports torch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "gradio", "mediapipe")
PROBE = """import sys, runpy
sys.argv = ["controlnext", *{argv!r}]
try:
    runpy.run_module("controlnext", run_name="__main__")
except SystemExit as stop:
    code = stop.code
else:
    code = 0
print("imported:", ",".join(m for m in {heavy!r} if m in sys.modules) or "-", "exit:", code, file=sys.stderr)
"""


def commands(image: Path, folder: Path) -> list[tuple[str, list[str]]]:
    out = str(folder / "out.png")
    return [
        ("python itself (floor)", []),
        ("controlnext --help", ["--help"]),
        ("annotate canny", ["annotate", "canny", str(image), "-o", out]),
        ("annotate canny --output-size 512x512", ["annotate", "canny", str(image), "-o", out, "--output-size", "512x512"]),
        ("annotate: missing image", ["annotate", "canny", str(folder / "missing.png"), "-o", out]),
        ("annotate: unknown annotator", ["annotate", "cany", str(image), "-o", out]),
        ("annotate: output too large", ["annotate", "canny", str(image), "-o", out, "--output-size", "100000x100000"]),
        ("generate: missing image", ["generate", "-p", "x", "-c", "canny", "-i", str(folder / "missing.png")]),
        ("generate: unknown annotator", ["generate", "-p", "x", "-c", "canny", "-i", str(image), "--annotator", "x"]),
        ("train: no output folder", ["train", "--data", "shapes-canny"]),
        ("serve: bad port", ["serve", "--port", "-5"]),
        ("bench: bad threads", ["bench", "--threads", "0"]),
    ]


def time_command(argv: list[str]) -> tuple[float, str]:
    code = PROBE.format(argv=argv, heavy=HEAVY) if argv else "pass"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    lines = [line for line in done.stderr.splitlines() if line.startswith("imported:")]
    return seconds, (lines[-1].removeprefix("imported: ") if lines else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs per command (default: 5)")
    parser.add_argument("--image", type=Path, default=None, help="photo to annotate (default: a made-up 768x512 one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        image = args.image
        if image is None:
            image = folder / "photo.png"
            pixels = np.random.default_rng(0).integers(0, 256, (512, 768, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(image)
        print(f"{'command':40s} {'median s':>9s} {'min s':>7s} {'max s':>7s}  heavy imports, exit code")
        for label, argv in commands(image, folder):
            runs = [time_command(argv) for _ in range(args.rounds)]
            seconds = [s for s, _ in runs]
            print(f"{label:40s} {statistics.median(seconds):9.2f} {min(seconds):7.2f} {max(seconds):7.2f}  {runs[-1][1]}")


if __name__ == "__main__":
    main()
