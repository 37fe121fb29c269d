"""Deploy test session: torch must be unimportable, proving the line runtime never needs it."""

import sys

# Must run before anything can import torch: a None entry makes `import torch` raise ImportError.
for _blocked in ("torch", "torchvision"):
    sys.modules[_blocked] = None

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from onnx_models import GRAY_1CH, GRAY_TO_RGB, RGB, write_model  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def rgb_model(model_dir) -> Path:
    return write_model(RGB, model_dir / "rgb.onnx")


@pytest.fixture(scope="session")
def gray3_model(model_dir) -> Path:
    return write_model(GRAY_TO_RGB, model_dir / "gray3.onnx")


@pytest.fixture(scope="session")
def gray1_model(model_dir) -> Path:
    return write_model(GRAY_1CH, model_dir / "gray1.onnx")


@pytest.fixture
def dirs(tmp_path):
    """Watch mode: (drop folder, rejected folder, results file)."""
    drop, rejected = tmp_path / "drop", tmp_path / "rejected"
    drop.mkdir()
    return drop, rejected, tmp_path / "state" / "results.jsonl"
