"""Every fenced shell and Python example of the README and docs/ runs as written, on the embedded model; the
ones that need real weights, photos, GPUs or run for minutes are listed in SKIPPED, and that list is exact."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from controlnext.request import ASSETS, DEFAULT_BASE, configured_size

REPOSITORY = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPOSITORY)) for p in (REPOSITORY / "docs").glob("*.md")),
             "scripts/README.md"]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)

# (document, first line of the example) -> why it does not run here
SKIPPED = {
    ("README.md", "controlnext generate --base /models/stable-diffusion-xl-base-1.0 \\"): "needs SDXL weights",
    ("README.md", 'pip install -c constraints.txt -e ".[web]" && controlnext serve   # open http://127.0.0.1:7860/'):
        "serves until interrupted; tests/test_web.py runs the same app",
    ("README.md", 'pip install -c constraints.txt -e ".[test,pose,video,web,browser,train]" && python -m pytest -q'):
        "runs this very suite",
    ("README.md", 'pip install -c constraints.txt -e ".[video,pose]"'): "needs Stable Video Diffusion weights and a GPU",
    ("README.md", "controlnext generate --base /models/stable-diffusion-3-medium-diffusers --without-t5 \\"):
        "needs SD3 weights and a trained control",
    ("docs/video.md", 'pip install -c constraints.txt -e ".[video,pose]"'): "needs Stable Video Diffusion weights and a GPU",
    ("README.md", "M='{\"stem_channels\": [16, 16, 32], \"block_out_channels\": [32, 64], \"block_groups\": [4, 8], "
                  "\"time_proj_dim\": 32, \"time_embed_dim\": 64}'"): "the convergence study, two hours on 2 cores",
    ("docs/video.md", "import torch"): "needs Stable Video Diffusion weights and a GPU",
    ("README.md", "import torch"): "needs Stable Diffusion 1.5 weights, a control and a LoRA under /models",
    ("README.md", "controlnext annotate canny photo.jpg -o edges.png --output-size 512x768 --option low_threshold=100 "
                  "high_threshold=200"): "needs the user's photos and control",
    ("README.md", 'pip install -c constraints.txt -e ".[train]"'): "needs SD 1.5 weights; the other runs train for minutes",
    ("docs/training.md", 'pip install -c constraints.txt -e ".[train]"'): "needs SD 1.5 weights and fill50k",
    ("docs/training.md", "from controlnext.training import TrainConfig, train"): "needs SD 1.5 weights and fill50k",
    ("docs/training.md", "accelerate launch --multi_gpu --num_processes 8 -m controlnext train --base ... --data ... "
                         "--output-dir ..."): "needs 8 GPUs",
    ("docs/training.md", "# DeepSpeed ZeRO stage 2 (optimizer state and gradients sharded); keep its accumulation "
                         "equal to ours"): "needs 8 GPUs and DeepSpeed",
    ("docs/training.md", "register(ControlMethod("): "an excerpt of controlnext/methods/controlnet.py",
    ("docs/web.md", 'pip install -c constraints.txt -e ".[web]"'): "serves until interrupted",
    ("docs/web.md", "controlnext serve --models-dir ~/models --base /models/sd15.safetensors --control /models/my-canny "
                    "\\"): "needs SD 1.5 weights and serves until interrupted",
    ("scripts/README.md", "python scripts/train_base.py --log base.log          # writes controlnext/assets/base/ "
                          "(replaces it)"): "retrains the embedded model (an hour and more)",
    ("scripts/README.md", "python scripts/train_base.py --output runs/base-continued --init-from controlnext/assets/base "
                          "--train-images 30000 \\"): "continues the embedded model's training (minutes on a GPU, hours "
                                                        "on a CPU)",
    ("scripts/README.md", "controlnext train --data shapes-canny --resolution 128 --init-control "
                          "controlnext/assets/controls/canny \\"): "trains the whole UNet for 12 minutes on 2 cores; "
                                                                  "tests/test_training.py trains on fewer steps",
    ("scripts/README.md", "controlnext train --method controlnet --data shapes-canny --resolution 128 "
                          "--generated-examples 6400 \\"): "trains for 25 minutes on 2 cores; tests/test_training.py "
                                                            "trains a ControlNet on fewer steps",
    ("scripts/README.md", "python scripts/train_base.py --output /tmp/tiny_base --train-images 200 --vae-steps 20 "
                          "--unet-steps 30 --eval-every 0"): "trains for half a minute; tests/test_base_model.py runs "
                                                             "the training on fewer steps",
}
SERVER_PORT = 7860  # what the curl example of docs/web.md talks to

# What the examples find on PATH: the worktree's controlnext, and a pip that checks the extras asked for exist (the
# project is installed already; installing again would change the environment the suite runs in).
SHIMS = {
    "controlnext": '#!/bin/sh\nexec "{python}" -m controlnext "$@"\n',
    "python": '#!/bin/sh\nexec "{python}" "$@"\n',
    "pip": '#!/bin/sh\nexec "{python}" "{tests}/test_doc_examples.py" pip "$@"\n',
}


def examples() -> list[tuple[str, str, str]]:
    found = []
    for document in DOCUMENTS:
        for match in BLOCK.finditer((REPOSITORY / document).read_text()):
            found.append((document, match.group(1), match.group(2)))
    return found


def key(document: str, code: str) -> tuple[str, str]:
    return document, code.splitlines()[0]


# (document, first line) of the examples that run here; an example in neither list fails the test below and is
# not run (it might retrain a shipped model through the checkout's folders)
RUNNABLE = {
    ("README.md", "pip install -c constraints.txt -e . && controlnext generate --control canny --image "
                  "examples/circle.png --prompt \"a red circle on a blue background\" --output outputs/circle.png"),
    ("README.md", "from controlnext.generation import generate"),
    ("README.md", "controlnext generate --base controlnext/assets/sd3-base --control "
                  "controlnext/assets/sd3-controls/canny \\"),
    ("docs/web.md", "base64 -w0 examples/circle.png > image.b64"),
    ("scripts/README.md", "from diffusers import StableDiffusionPipeline"),
}
RUN = [(d, lang, code) for d, lang, code in examples() if key(d, code) in RUNNABLE]


def test_every_example_is_run_or_listed_as_skipped():
    keys = [key(d, code) for d, _, code in examples()]
    assert len(keys) == len(set(keys)), "two examples start with the same line; the lists cannot tell them apart"
    assert not (set(SKIPPED) | RUNNABLE) - set(keys), "the lists name examples the documents no longer have"
    assert not set(keys) - set(SKIPPED) - RUNNABLE, "an example is neither run nor listed as skipped, with a reason"
    assert not set(SKIPPED) & RUNNABLE


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A folder that looks like a checkout (examples, package, constraints), with the shims first on PATH."""
    for name in ("examples", "controlnext", "scripts", "constraints.txt", "pyproject.toml"):
        (tmp_path / name).symlink_to(REPOSITORY / name)
    shims = tmp_path / ".shims"
    shims.mkdir()
    for name, text in SHIMS.items():
        (shims / name).write_text(text.format(python=sys.executable, tests=REPOSITORY / "tests"))
        (shims / name).chmod(0o755)
    return tmp_path


def run_example(lang: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    script = cwd / ("example.sh" if lang == "bash" else "example.py")
    script.write_text(code)
    env = {**os.environ, "PATH": f"{cwd / '.shims'}:{os.environ['PATH']}", "PYTHONPATH": str(REPOSITORY),
           "OMP_NUM_THREADS": "1"}
    argv = ["bash", "-eo", "pipefail", str(script)] if lang == "bash" else [sys.executable, str(script)]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("document, lang, code", RUN, ids=[f"{d}:{c.splitlines()[0][:40]}" for d, _, c in RUN])
def test_example_runs_as_written(document, lang, code, workdir):
    with serving_if_needed(code):
        done = run_example(lang, code, workdir)
    assert done.returncode == 0, f"{document} example failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    bases = {"outputs/circle.png": DEFAULT_BASE, "out.png": DEFAULT_BASE, "sd3.png": ASSETS / "sd3-base"}
    for written, base in bases.items():
        if written in code:  # at the base's own size
            assert Image.open(workdir / written).size == configured_size(base)


class serving_if_needed:
    """`controlnext serve` with no flags on its default port, while an example talks to it."""

    def __init__(self, code: str):
        self.needed = f"127.0.0.1:{SERVER_PORT}" in code
        self.server = None

    def __enter__(self):
        if not self.needed:
            return self
        pytest.importorskip("gradio")
        import uvicorn

        from controlnext.web import WebConfig, create_app

        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", SERVER_PORT)) == 0:
                pytest.skip(f"port {SERVER_PORT} is in use; the example talks to a server there")
        self.server = uvicorn.Server(uvicorn.Config(create_app(WebConfig()), host="127.0.0.1", port=SERVER_PORT,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(10)


def pip_shim(argv: list[str]) -> int:
    """`pip install -c constraints.txt -e ".[extras]"` as the examples write it: the extras must exist."""
    import tomllib

    declared = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    if argv[:1] != ["install"] or "-e" not in argv:
        print(f"the examples' pip takes `install -e .[extras]`, not {argv}", file=sys.stderr)
        return 1
    target = argv[argv.index("-e") + 1]
    extras = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
    unknown = [x for x in (extras.group(1) or "").split(",") if x and x not in declared] if extras else [target]
    if unknown:
        print(f"unknown extras or target: {unknown}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["pip"]:
    sys.exit(pip_shim(sys.argv[2:]))
