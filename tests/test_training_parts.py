"""The trainer's parts without training: flags from the config, parameter selection, data, checkpoint files."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import pytest
import torch
from PIL import Image
from training_helpers import circle_example, write_data_folder

from controlnext import cli
from controlnext.errors import ControlNextError
from controlnext.images import pil_to_tensor, resize_and_crop
from controlnext.testing import tiny_unet
from controlnext.training import TrainConfig
from controlnext.training import checkpoint as ckpt
from controlnext.training.config import config_from_args
from controlnext.training.data import GENERATED_DATA, ControlDataset, StreamBatchSampler, open_source
from controlnext.training.selection import describe_counts, resolve_patterns, select_parameters, transformer_blocks


def parse_train(monkeypatch, argv: list[str]):
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["train"])
    return cli.build_parser().parse_args(["train", *argv])


# -- configuration and flags ---------------------------------------------------------------------------------

def test_every_config_field_is_a_flag_with_help(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["train"])
    parser = cli.build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    flags = {action.dest: action for action in train_parser._actions}
    for field in dataclasses.fields(TrainConfig):
        assert field.name in flags, field.name
        assert len(flags[field.name].help) > 20


def test_flags_override_a_config_file_over_the_defaults(monkeypatch, tmp_path):
    saved = TrainConfig(base="b", data="d", output_dir="o", learning_rate=3e-5, batch_size=8)
    (tmp_path / "train_config.json").write_text(saved.to_json())
    args = parse_train(monkeypatch, ["--config", str(tmp_path / "train_config.json"), "--batch-size", "2",
                                     "--trainable", "sd15", "mid_block.*to_q", "--no-tensorboard",
                                     "--mixed-precision", "bf16", "--module-learning-rate", "1e-3"])
    config = config_from_args(args)
    assert (config.base, config.learning_rate, config.batch_size) == ("b", 3e-5, 2)
    assert config.trainable == ["sd15", "mid_block.*to_q"] and config.tensorboard is False
    assert (config.mixed_precision, config.module_lr) == ("bf16", 1e-3)
    assert config_from_args(parse_train(monkeypatch, [])) == TrainConfig()


@pytest.mark.parametrize("method, module_rate, expected", [
    ("controlnext", None, 1e-4),  # its maintainers' recipe: 10x the base subset's rate
    ("controlnet", None, 1e-5),  # the copy is all it trains: the paper's rate is --learning-rate
    ("controlnet", 3e-4, 3e-4),  # given, it wins
    ("controlnext", 2e-5, 2e-5),
])
def test_the_control_models_learning_rate_follows_its_method(method, module_rate, expected):
    from controlnext.training.trainer import make_optimizer

    config = TrainConfig(method=method, learning_rate=1e-5, module_learning_rate=module_rate)
    optimizer = make_optimizer(torch.nn.Linear(2, 2), [torch.nn.Parameter(torch.zeros(1))], config)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([expected, 1e-5])


def test_validation_noise_follows_the_seed_unless_a_validation_seed_is_given():
    assert TrainConfig(seed=3).sampling_seed == 3
    assert TrainConfig(seed=3, validation_seed=0).sampling_seed == 0


@pytest.mark.parametrize("argv, message", [
    ([], "--data is required"),
    (["--data", "d", "--output-dir", "o", "--resolution", "60"], "not a multiple of 8"),
    (["--data", "d", "--output-dir", "o", "--empty-prompt-ratio", "1.5"], "must lie in [0, 1]"),
    (["--data", "d", "--output-dir", "o", "--method", "nope"], "unknown --method 'nope'"),
])
def test_cli_prints_bad_options_as_one_line(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["train"])
    assert cli.main(["train", *argv]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("controlnext train: error:") and message in error[0]


# -- which base weights train ---------------------------------------------------------------------------------

def _to_out_of(blocks):
    return {f"{b}.attn{i}.to_out.0.{kind}" for b in blocks for i in (1, 2) for kind in ("weight", "bias")}


SELECTIONS = [
    (["sd15"], lambda names: {n for n in names if "to_out" in n}),
    (["sdxl"], lambda names: {n for n in names if ".attn2." in n and "to_out" in n}),
    (["none"], lambda names: set()),
    (["spaced"], lambda names: _to_out_of(["down_blocks.0.attentions.0.transformer_blocks.0",
                                            "up_blocks.1.attentions.0.transformer_blocks.0"])),
    (["none", r"mid_block\..*to_q"], lambda names: {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                                                    "mid_block.attentions.0.transformer_blocks.0.attn2.to_q.weight"}),
]


@pytest.mark.parametrize("trainable, expected", SELECTIONS, ids=[" ".join(s[0]) for s in SELECTIONS])
def test_selection_presets_and_patterns(trainable, expected):
    unet = tiny_unet()
    names = [n for n, _ in unet.named_parameters()]
    patterns = resolve_patterns(unet, trainable, is_sdxl=False, spaced_every=2)
    assert set(select_parameters(unet, patterns)) == expected(names)


def test_transformer_blocks_follow_the_features_and_counts_are_reported():
    unet = tiny_unet()
    assert transformer_blocks(unet) == [
        "down_blocks.0.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.0.transformer_blocks.0", "up_blocks.1.attentions.1.transformer_blocks.0",
    ]
    selected = select_parameters(unet, ["to_out"])
    unet_count = sum(p.numel() for n, p in unet.named_parameters() if n in selected)
    module = torch.nn.Linear(3, 4)  # 16 parameters
    line = describe_counts(module, unet, selected)
    assert f"+ base UNet {unet_count} in {len(selected)} tensors" in line and "control module 16" in line


# -- data -------------------------------------------------------------------------------------------------------

def test_folder_images_of_another_size_are_resized_and_centre_cropped(tmp_path):
    image, condition, caption = circle_example(3, size=(80, 64))
    image.save(tmp_path / "a.png")
    condition.save(tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"target": "a.png", "hint": "b.png", "prompt": caption}))
    config = TrainConfig(data=str(tmp_path), resolution=32, image_column="target",
                         conditioning_image_column="hint", caption_column="prompt")
    item = ControlDataset(open_source(config), 32)[0]
    torch.testing.assert_close(item["pixel_values"], pil_to_tensor(resize_and_crop(image, 32, 32)) * 2 - 1)
    torch.testing.assert_close(item["conditioning"], pil_to_tensor(resize_and_crop(condition, 32, 32)))
    assert item["original_size"].tolist() == [64, 80] and item["crop_top_left"].tolist() == [0, 4]
    assert item["caption"] == caption


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_hugging_face_datasets_in_the_fill50k_layout(tmp_path, layout):
    datasets = pytest.importorskip("datasets")
    examples = [circle_example(i) for i in range(3)]
    data = datasets.Dataset.from_dict({
        "image": [e[0] for e in examples], "conditioning_image": [e[1] for e in examples],
        "text": [f"caption {i}" for i in range(3)],
    }).cast_column("image", datasets.Image()).cast_column("conditioning_image", datasets.Image())
    if layout == "parquet":
        (tmp_path / "data").mkdir()
        data.to_parquet(str(tmp_path / "data" / "train-00000.parquet"))
    else:
        data.save_to_disk(str(tmp_path / "data"))
    source = open_source(TrainConfig(data=str(tmp_path / "data")))
    assert len(source) == 3
    image, condition, caption = source[2]
    assert caption == "caption 2"
    assert torch.equal(pil_to_tensor(image), pil_to_tensor(examples[2][0]))
    assert torch.equal(pil_to_tensor(condition), pil_to_tensor(examples[2][1]))


def test_python_examples_and_generated_data_sets(monkeypatch):
    by_index = open_source(TrainConfig(generated_examples=5), examples=circle_example)
    assert len(by_index) == 5 and by_index[4][2] == circle_example(4)[2]
    from_iterable = open_source(TrainConfig(generated_examples=3), examples=(circle_example(i) for i in range(10)))
    assert len(from_iterable) == 3
    monkeypatch.setitem(GENERATED_DATA, "circles", lambda config: circle_example)
    generated = open_source(TrainConfig(data="circles", generated_examples=7))
    assert len(generated) == 7 and torch.equal(pil_to_tensor(generated[6][0]), pil_to_tensor(circle_example(6)[0]))
    with pytest.raises(ControlNextError, match="not an \\(image, condition, caption\\) triple"):
        open_source(TrainConfig(), examples=[("just", "two")])[0]


def test_annotator_makes_conditions_from_the_cropped_image(tmp_path, monkeypatch):
    calls = []

    def annotate(name, image):
        calls.append((name, image.size))
        return Image.eval(image, lambda v: 255 - v)

    monkeypatch.setitem(sys.modules, "controlnext.annotators", types.SimpleNamespace(annotate=annotate))
    folder = write_data_folder(tmp_path / "data", count=1, columns=("image", "unused", "text"))
    config = TrainConfig(data=str(folder), annotator="invert")  # no conditioning_image column needed
    item = ControlDataset(open_source(config), 64, "invert")[0]
    torch.testing.assert_close(item["conditioning"], 1 - (item["pixel_values"] + 1) / 2, atol=1e-6, rtol=0)
    assert calls == [("invert", (64, 64))]


def test_annotators_with_a_device_run_on_the_cpu_in_data_loading_processes(tmp_path, monkeypatch):
    """Forked loading processes cannot use a GPU the trainer has started: there a learned annotator is told to use
    the CPU; in the trainer's own process it keeps its default, and an annotator without a device is left alone."""
    from controlnext.annotators import registry

    def device_probe(image, *, device: str = "auto"):  # white where told to use the CPU
        return Image.new("RGB", image.size, "white" if device == "cpu" else "black")

    monkeypatch.setitem(registry._REGISTRY, "device_probe", registry.AnnotatorSpec("device_probe", device_probe))
    monkeypatch.setitem(registry._REGISTRY, "plain_probe", registry.AnnotatorSpec("plain_probe", lambda image: image))
    folder = write_data_folder(tmp_path / "data", count=2, columns=("image", "unused", "text"))
    for name, workers, white in [("device_probe", 0, False), ("device_probe", 1, True), ("plain_probe", 1, None)]:
        dataset = ControlDataset(open_source(TrainConfig(data=str(folder), annotator=name)), 32, name)
        for item in torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers):
            if white is not None:
                assert bool((item["conditioning"] == 1).all()) is white
            else:
                assert torch.equal(item["conditioning"] * 2 - 1, item["pixel_values"])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_stream_batches_split_across_processes_and_resume_at_a_position(world_size):
    n, batch, steps = 7, 2, 9
    single = iter(StreamBatchSampler(n, batch * world_size, seed=4))
    ranks = [iter(StreamBatchSampler(n, batch, seed=4, rank=r, world_size=world_size)) for r in range(world_size)]
    stream = []
    for _ in range(steps):
        together = [i for rank in ranks for i in next(rank)]
        assert together == next(single)  # the processes share each global batch, in order
        stream += together
    for epoch in range(len(stream) // n):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))  # each epoch is a permutation
    start = 3 * batch * world_size
    resumed = iter(StreamBatchSampler(n, batch, seed=4, rank=0, world_size=world_size, start=start))
    assert next(resumed) == stream[start:start + batch]


# -- checkpoint files ----------------------------------------------------------------------------------------

class OneProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass


def test_a_crash_while_writing_leaves_no_checkpoint(tmp_path):
    def write_main(folder):
        (folder / ckpt.STATE_FILE).write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.write_atomically(OneProcess(), tmp_path, 10, write_main, lambda folder: None)
    assert ckpt.list_checkpoints(tmp_path) == [] and ckpt.resolve_resume(tmp_path, "latest") is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [".partial-checkpoint-000010"]
    ckpt.remove_partial(tmp_path)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_checkpoints_are_renamed_complete_and_pruned(tmp_path):
    for step in (5, 10, 15):
        ckpt.write_atomically(OneProcess(), tmp_path, step,
                              lambda folder: (folder / ckpt.STATE_FILE).write_text("{}"), lambda folder: None)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-000005", "checkpoint-000010",
                                                                  "checkpoint-000015"]
    ckpt.prune(tmp_path, keep=2)
    assert ckpt.resolve_resume(tmp_path, "latest").name == "checkpoint-000015"
    assert len(ckpt.list_checkpoints(tmp_path)) == 2
    with pytest.raises(ControlNextError, match="already holds checkpoints"):
        ckpt.resolve_resume(tmp_path, None)
    with pytest.raises(ControlNextError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "checkpoints"))


def test_rng_states_round_trip(tmp_path):
    import random

    import numpy as np

    ckpt.save_rng_states(tmp_path, rank=1)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert ckpt.load_rng_states(tmp_path, rank=1) and not ckpt.load_rng_states(tmp_path, rank=0)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected



def test_log_keeps_rows_up_to_the_resumed_step_and_writes_tensorboard(tmp_path, monkeypatch):
    from controlnext.training.monitor import TrainingLog

    scalars = []

    class Writer:
        def __init__(self, folder):
            self.folder = folder

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    log = TrainingLog(tmp_path, "edge_f1", None, tensorboard=True, enabled=True)
    for step in range(1, 5):
        log.write(step, {"loss": step / 10, "fidelity_edge_f1": 0.5 if step == 2 else None})
    log.close()
    with open(tmp_path / "log.csv", "a") as file:
        file.write("5,0.1")  # a row cut short by a crash
    resumed = TrainingLog(tmp_path, "edge_f1", 2, tensorboard=False, enabled=True)
    resumed.write(3, {"loss": 9.0})
    resumed.close()
    import csv

    with open(tmp_path / "log.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["step"], r["loss"], r["fidelity_edge_f1"]) for r in rows] == [
        ("1", "0.1", ""), ("2", "0.2", "0.5"), ("3", "9.0", "")]
    assert ("train/loss", 0.1, 1) in scalars and ("train/fidelity_edge_f1", 0.5, 2) in scalars
