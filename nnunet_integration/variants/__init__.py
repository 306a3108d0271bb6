"""nnU-Net-style variants of the LesionDiffusion trainers, kept out of the product's ``trainers.py``
as nnU-Net keeps ``variants/training_length/``: each is a one-screen subclass whose name says what
changes. ``training_length``: fewer epochs; ``tiny_network``: a 4-16-feature network and a handful
of iterations (tests, CI); ``fewshot_cpu``: the calibrated CPU recipe of the few-shot benchmark and
the demo."""

from .fewshot_cpu import *  # noqa: F401,F403
from .tiny_network import *  # noqa: F401,F403
from .training_length import *  # noqa: F401,F403
from .fewshot_cpu import __all__ as _fewshot
from .tiny_network import __all__ as _tiny
from .training_length import __all__ as _length

__all__ = [*_length, *_tiny, *_fewshot]
