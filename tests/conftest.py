from pathlib import Path

import pytest
import torch

SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "images"


# Tiny test models run thousands of small ops; on a machine shared with other work a second thread makes
# each op wait for a busy core.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny random StableDiffusionPipeline folder (64x64 images) shared by the session's tests."""
    from controlnext.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def tiny_control(tmp_path_factory):
    """A tiny ControlNeXt control folder (our format) that fits `tiny_base`, with trained UNet tensors."""
    from controlnext.control.loading import save_controlnext
    from controlnext.testing import tiny_controlnext

    folder = tmp_path_factory.mktemp("tiny-control")
    return save_controlnext(folder, tiny_controlnext(seed=3))


@pytest.fixture
def shared_images():
    if not SHARED_IMAGES.is_dir():
        pytest.skip("../shared/images is not present")
    return SHARED_IMAGES
