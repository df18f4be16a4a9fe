"""Neural annotators on tiny random local models: depth, normals, segmentation, learned soft edges."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from annotator_helpers import array, shapes_image
from safetensors.torch import save_file

from controlnext.annotators import annotate
from controlnext.annotators import depth_estimation
from controlnext.annotators.ade20k_palette import ADE20K_PALETTE
from controlnext.annotators.depth_estimation import _predicts_distance
from controlnext.annotators.semantic_segmentation import label_colors
from controlnext.annotators.softedge_net import SoftEdgeNet, SoftEdgeNetConfig, load_soft_edge_net, save_soft_edge_net
from controlnext.errors import ControlNextError

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Loading must never reach the network: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("an annotator tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def save_tiny(folder, model, processor):
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny seeded DPT, Depth Anything and SegFormer models saved as local folders."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_models")
    dpt = transformers.DPTForDepthEstimation(transformers.DPTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        reassemble_factors=[4, 2, 1, 0.5], head_in_index=-1,
    ))  # fmt: skip
    backbone = transformers.Dinov2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=28, patch_size=14,
        out_features=["stage1", "stage2"], reshape_hidden_states=False,
    )  # fmt: skip
    depth_anything = transformers.DepthAnythingForDepthEstimation(transformers.DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=16, patch_size=14, neck_hidden_sizes=[8, 8],
        fusion_hidden_size=8, head_hidden_size=8, reassemble_factors=[2, 1],
    ))  # fmt: skip
    segformer = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
        num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=150,
    ))  # fmt: skip
    return {
        "dpt": save_tiny(root / "dpt", dpt, transformers.DPTImageProcessor(size={"height": 32, "width": 32})),
        "depth_anything": save_tiny(
            root / "depth_anything", depth_anything, transformers.DPTImageProcessor(size={"height": 28, "width": 28})
        ),
        "segformer": save_tiny(
            root / "segformer", segformer, transformers.SegformerImageProcessor(size={"height": 32, "width": 32})
        ),
    }


@pytest.mark.parametrize("model", ["dpt", "depth_anything"])
def test_depth_is_a_full_range_grey_map_of_the_input_size(tiny_models, model):
    image = shapes_image(45, 61)
    out = annotate("depth", image, model_path=tiny_models[model], device="cpu")
    assert out.mode == "RGB" and out.size == (45, 61)
    rgb = array(out)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert rgb.min() == 0 and rgb.max() == 255  # normalised per image
    assert np.array_equal(rgb, array(annotate("depth", image, model_path=tiny_models[model], device="cpu")))
    inverted = array(annotate("depth", image, model_path=tiny_models[model], invert=True, device="cpu"))
    assert np.abs(inverted.astype(int) - (255 - rgb.astype(int))).max() <= 1


def test_normals_face_the_viewer_and_follow_the_depth_slope(tiny_models, monkeypatch):
    out = array(annotate("normals", shapes_image(40, 30), model_path=tiny_models["dpt"], device="cpu"))
    assert out.shape == (30, 40, 3) and out[..., 2].min() >= 127  # z >= 0: every normal faces the viewer

    ramp = np.tile(np.linspace(0.2, 1.0, 40, dtype=np.float32), (30, 1))  # nearer towards the right
    monkeypatch.setattr(depth_estimation, "estimate_nearness", lambda image, model_path, device: ramp)
    tilted = array(annotate("normals", shapes_image(40, 30), model_path="unused"))
    inner = tilted[5:-5, 5:-5].reshape(-1, 3)
    assert (inner[:, 0] > 140).all() and (np.abs(inner[:, 1].astype(int) - 128) <= 1).all()  # red: x slope, no y
    flat = array(annotate("normals", shapes_image(40, 30), model_path="unused", background_threshold=0.99))
    assert (flat == (128, 128, 255)).all()  # all background: flat, facing the viewer


def test_metric_models_are_flipped_so_near_is_white():
    assert _predicts_distance(transformers.DepthAnythingConfig(depth_estimation_type="metric"))
    assert not _predicts_distance(transformers.DepthAnythingConfig())
    assert not _predicts_distance(transformers.DPTConfig())


def test_segmentation_uses_the_ade20k_palette(tiny_models):
    image = shapes_image(50, 34)
    out = annotate("segmentation", image, model_path=tiny_models["segformer"], device="cpu")
    assert out.mode == "RGB" and out.size == (50, 34)
    colours = {tuple(c) for c in np.unique(array(out).reshape(-1, 3), axis=0)}
    assert colours <= set(ADE20K_PALETTE)
    resized = annotate(
        "segmentation", image, model_path=tiny_models["segformer"], device="cpu", resolution=16, output_size=(80, 80)
    )
    assert {tuple(c) for c in np.unique(array(resized).reshape(-1, 3), axis=0)} <= set(ADE20K_PALETTE)


def test_palette_data():
    assert len(ADE20K_PALETTE) == 150 and ADE20K_PALETTE[0] == (120, 120, 120) and ADE20K_PALETTE[2] == (6, 230, 230)
    colours = label_colors(160)
    assert colours.shape == (160, 3) and (colours[:150] == np.asarray(ADE20K_PALETTE)).all()


@pytest.mark.parametrize(
    "name, folder, message",
    [
        ("depth", "missing", "model folder not found"),
        ("depth", "empty", "has no config.json"),
        ("depth", "segformer", "holds a SegformerForSemanticSegmentation, not a depth estimation model"),
        ("segmentation", "dpt", "holds a DPTForDepthEstimation, not a semantic segmentation model"),
        ("segmentation", "no_architectures", "holds a 'dinov2' model, not a semantic segmentation model"),
        ("normals", "no_processor", "has no preprocessor_config.json"),
    ],
)
def test_wrong_model_folder_says_what_is_expected(tiny_models, tmp_path, name, folder, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_processor").mkdir()
    (tmp_path / "no_processor" / "config.json").write_text("{}")
    (tmp_path / "no_architectures").mkdir()
    backbone_only = transformers.Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
    backbone_only.save_pretrained(tmp_path / "no_architectures")
    (tmp_path / "no_architectures" / "preprocessor_config.json").write_text("{}")
    path = tiny_models.get(folder, str(tmp_path / folder))
    with pytest.raises(ControlNextError, match=message):
        annotate(name, shapes_image(), model_path=path, device="cpu")


def test_missing_weights_in_a_model_folder(tiny_models, tmp_path):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_text((Path(tiny_models["dpt"]) / name).read_text())
    with pytest.raises(ControlNextError, match="cannot load the depth estimation model"):
        annotate("depth", shapes_image(), model_path=str(folder), device="cpu")


TINY_EDGES = SoftEdgeNetConfig(stage_channels=(4, 8, 8), convs_per_stage=(1, 1, 2))


def test_learned_soft_edges_from_a_local_folder(tmp_path):
    torch.manual_seed(0)
    model = SoftEdgeNet(TINY_EDGES)
    folder = save_soft_edge_net(model, tmp_path / "hed")
    image = shapes_image(33, 47)
    out = annotate("softedge", image, model_path=str(folder))
    assert out.mode == "RGB" and out.size == (33, 47)
    with torch.no_grad():
        expected = model(torch.from_numpy(array(image).copy()).permute(2, 0, 1)[None].float() / 255)[0, 0]  # (h, w)
    np.testing.assert_allclose(array(out)[..., 0] / 255, expected.numpy(), atol=1 / 255 + 1e-6)
    assert not np.array_equal(array(out), array(annotate("softedge", image)))  # not the classical path
    assert load_soft_edge_net(folder / "model.safetensors").config == TINY_EDGES  # a file with config.json beside


def test_soft_edge_weights_that_do_not_fit(tmp_path):
    with pytest.raises(ControlNextError, match="soft edge weights not found"):
        annotate("softedge", shapes_image(), model_path=str(tmp_path / "nothing"))
    lone = tmp_path / "lone" / "edges.safetensors"
    lone.parent.mkdir()
    save_file(SoftEdgeNet(TINY_EDGES).state_dict(), str(lone))  # no config.json: the default HED size is expected
    with pytest.raises(ControlNextError, match="does not hold SoftEdgeNet weights"):
        annotate("softedge", shapes_image(), model_path=str(lone))
    folder = save_soft_edge_net(SoftEdgeNet(TINY_EDGES), tmp_path / "bad_config")
    (folder / "config.json").write_text(json.dumps({"stage_channels": [4], "convs": [1]}))
    with pytest.raises(ControlNextError, match="is not a SoftEdgeNet config"):
        annotate("softedge", shapes_image(), model_path=str(folder))


@pytest.fixture(scope="module")
def more_tiny_models(tmp_path_factory):
    """Tiny seeded GLPN (metric depth) and UperNet (ConvNeXt backbone) models saved as local folders."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("more_tiny_models")
    glpn = transformers.GLPNForDepthEstimation(transformers.GLPNConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
        num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=8, head_in_index=-1,
    ))  # fmt: skip
    backbone = transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage1", "stage2"], num_stages=2
    )
    upernet = transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(
        backbone_config=backbone, hidden_size=8, pool_scales=[1, 2], auxiliary_in_channels=16, auxiliary_channels=8,
        num_labels=150, use_auxiliary_head=False,
    ))  # fmt: skip
    return {
        "glpn": save_tiny(root / "glpn", glpn, transformers.GLPNImageProcessor()),
        "upernet": save_tiny(
            root / "upernet", upernet, transformers.SegformerImageProcessor(size={"height": 32, "width": 32})
        ),
    }


def test_glpn_depth_is_flipped_to_near_white_and_keeps_the_size(more_tiny_models):
    assert _predicts_distance(transformers.GLPNConfig())
    image = shapes_image(45, 61)
    rgb = array(annotate("depth", image, model_path=more_tiny_models["glpn"], device="cpu"))
    assert rgb.shape == (61, 45, 3) and rgb.min() == 0 and rgb.max() == 255
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_upernet_segmentation_uses_the_ade20k_palette(more_tiny_models):
    out = annotate("segmentation", shapes_image(50, 34), model_path=more_tiny_models["upernet"], device="cpu")
    assert out.size == (50, 34)
    assert {tuple(c) for c in np.unique(array(out).reshape(-1, 3), axis=0)} <= set(ADE20K_PALETTE)
