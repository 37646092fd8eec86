"""glmoe: GGUF inference for the GLM4-MoE family."""
from ._core import GGUFError, KVCacheFullError, ModelError
from .draft import SuffixDecoding
from .grammar import GrammarError, LlamaGrammar
from .llama import LLAMA_DEFAULT_SEED, Llama

__all__ = ["GGUFError", "GrammarError", "KVCacheFullError", "Llama", "LlamaGrammar", "LLAMA_DEFAULT_SEED",
           "ModelError", "SuffixDecoding"]
