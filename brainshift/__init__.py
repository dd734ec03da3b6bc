"""brainshift: pre-operative MR -> intra-operative ultrasound registration (Learn2Reg ReMIND2Reg)."""
from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"


def model_dir() -> Path:
    """Folder of the shipped weights: ``$BRAINSHIFT_MODEL_DIR``, else ``model/`` beside the package."""
    env = os.environ.get("BRAINSHIFT_MODEL_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "model"
