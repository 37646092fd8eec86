"""glmoe: GGUF inference for the GLM4-MoE family."""
from . import _core
from ._core import GGUFError

__all__ = ["GGUFError"]
