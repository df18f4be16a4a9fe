"""`controlnext train` as a process: killed and resumed it repeats an uninterrupted run; two processes train."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest
import torch
from training_helpers import cli_arguments, losses, start_cli, subprocess_env, tiny_config, write_data_folder

from controlnext.control.loading import load_control
from controlnext.training.trainer import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data_folder(tmp_path_factory.mktemp("data"), count=6)


def test_resume_after_sigkill_repeats_the_uninterrupted_losses(tiny_base, data, tmp_path):
    config = tiny_config(tiny_base, data, tmp_path / "killed", max_steps=40, checkpoint_every=5, keep_checkpoints=2,
                         gradient_accumulation_steps=2, lr_warmup_steps=10, lr_scheduler="linear")
    process = start_cli(config)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed" / "checkpoints").glob("checkpoint-*")):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint within two minutes"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL  # it was still training
    interrupted_at = max(losses(tmp_path / "killed"))
    assert interrupted_at < 40

    torch.set_num_threads(1)
    config.resume = "latest"
    train(config)  # in this process: the step after the checkpoint must not depend on which process runs it

    reference = tiny_config(tiny_base, data, tmp_path / "uninterrupted", **{
        k: getattr(config, k) for k in ("max_steps", "checkpoint_every", "keep_checkpoints",
                                        "gradient_accumulation_steps", "lr_warmup_steps", "lr_scheduler")})
    train(reference)
    assert losses(tmp_path / "killed") == losses(tmp_path / "uninterrupted")  # every step, bit for bit
    assert sorted(losses(tmp_path / "killed")) == list(range(1, 41))


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not on PATH")
def test_accelerate_launch_two_processes_trains_and_checkpoints(tiny_base, data, tmp_path):
    config = tiny_config(tiny_base, data, tmp_path / "ddp", max_steps=4, checkpoint_every=2, cpu=True)
    # `--cpu` of accelerate launch starts one process; `--multi_gpu` starts two, which use gloo on the CPU.
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "controlnext", "train",
               *cli_arguments(config)]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("trained control saved to") == 1  # the main process reports

    last = tmp_path / "ddp" / "checkpoints" / "checkpoint-000004"
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["examples_seen"] == 4 * 2 * 2
    assert (last / "random_states_0.pt").is_file() and (last / "random_states_1.pt").is_file()
    assert sorted(losses(tmp_path / "ddp")) == [1, 2, 3, 4]
    exported = load_control(tmp_path / "ddp")
    assert exported.unet_weights and exported.metadata["steps"] == 4
