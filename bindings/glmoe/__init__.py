"""glmoe: GGUF inference for the GLM4-MoE family."""
from ._core import GGUFError, KVCacheFullError, ModelError
from .draft import SuffixDecoding
from .llama import LLAMA_DEFAULT_SEED, Llama

__all__ = ["GGUFError", "KVCacheFullError", "Llama", "LLAMA_DEFAULT_SEED", "ModelError", "SuffixDecoding"]
