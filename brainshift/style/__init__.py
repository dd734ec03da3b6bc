"""Style transfer iUS -> synthetic T1 (3D CycleGAN) and T2 -> T1-like remapping.

Modules: networks, losses, data (normalisation, patch sampling), real (real-image training volumes), train,
infer (sliding-window inference at the working spacing), t2, evaluate.

Public API: :func:`synthesize_t1`, :func:`load_style_model`, :func:`train_style` with
:class:`StyleTrainConfig`, :func:`t2_to_t1_like`.
"""
from .infer import StyleModel, load_style_model, stylize_file, synthesize_t1
from .t2 import t2_to_t1_like
from .train import StyleTrainConfig, train_style

__all__ = ["StyleModel", "StyleTrainConfig", "load_style_model", "stylize_file", "synthesize_t1", "t2_to_t1_like", "train_style"]
