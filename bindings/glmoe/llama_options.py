"""llama-cpp-python's Llama constructor options that glmoe has no counterpart for.

Each is either accepted because it cannot change results (speed, memory, loading; the caller is
warned once when one is set away from llama-cpp-python's default), or refused with
NotImplementedError unless it has a value that means what glmoe does anyway. docs/LLAMA_API.md
lists them with the rest of the API."""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Tuple

# Speed, memory or loading only; llama-cpp-python 0.3's defaults.
SPEED_ONLY_DEFAULTS: Dict[str, Any] = {
    "split_mode": 1, "tensor_split": None, "n_threads_batch": None,
    "offload_kqv": True, "flash_attn": False, "op_offload": None, "swa_full": None, "no_perf": False,
    "numa": False,
    "spm_infill": False,  # orders fill-in-the-middle prompts, and glmoe refuses suffix= anyway
}

_ROPE = "glmoe runs the model's own RoPE, without scaling or frequency overrides"
# name: (values that mean what glmoe does, why another value is refused)
REFUSED_UNLESS: Dict[str, Tuple[Tuple[Any, ...], str]] = {
    "vocab_only": ((False,), "glmoe always loads the weights (glmoe.tokenizer.GGUFTokenizer.from_gguf(path) "
                             "reads the vocabulary alone)"),
    "kv_overrides": ((None, {}), "overriding GGUF metadata is not implemented"),
    "main_gpu": ((0,), "glmoe uses the first visible GPU: choose it with CUDA_VISIBLE_DEVICES"),
    "rope_scaling_type": ((None, -1), _ROPE),
    "rope_freq_base": ((0.0,), _ROPE),
    "rope_freq_scale": ((0.0, 1.0), _ROPE),
    "yarn_ext_factor": ((-1.0,), _ROPE),
    "yarn_attn_factor": ((1.0,), _ROPE),
    "yarn_beta_fast": ((32.0,), _ROPE),
    "yarn_beta_slow": ((1.0,), _ROPE),
    "yarn_orig_ctx": ((0,), _ROPE),
    "pooling_type": ((-1, 0), "embed() returns every token's hidden state (no pooling)"),
    "attention_type": ((-1, 0), "GLM4-MoE attention is causal"),
    "lora_path": ((None,), "LoRA adapters are not implemented"),
    "lora_base": ((None,), "LoRA adapters are not implemented"),
    "lora_scale": ((1.0,), "LoRA adapters are not implemented"),
    "chat_handler": ((None,), "chats are formatted by the GGUF's own chat template"),
    "tokenizer": ((None,), "the GGUF's own tokenizer is used"),
}


def kv_type_id(name: str, value: Any) -> int:
    """type_k / type_v as the engine takes them: a KV cache type's GGML id (None: -1, each device's
    default); ValueError for any other value."""
    from . import _core

    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a GGML type id (an int) or None; got {value!r}")
    _core.check_kv_type(value, name)
    return value


def cache_type_arg(text: str) -> int:
    """argparse type of -ctk/-ctv (llama.cpp's --cache-type-k/-v): a KV cache type's name, as its GGML id."""
    from . import _core

    try:
        return _core.kv_type_from_name(text, "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"unsupported KV cache type {text!r} (glmoe has {_core.kv_type_names()})")


CACHE_TYPE_HELP = ("KV cache type of {}: f32, f16, bf16, q8_0, q4_0 (default: f32 on the CPU, f16 on the GPU, whose "
                   "layers take f16, bf16, q8_0 or q4_0)")


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. an array, whose == is elementwise
        return False


def check_init_options(options: Dict[str, Any]) -> List[str]:
    """Raises TypeError for an option llama-cpp-python does not have either, NotImplementedError for
    one glmoe cannot honour at its value. Returns the speed-only options set away from their default."""
    for name, value in options.items():
        if name in SPEED_ONLY_DEFAULTS:
            continue
        if name not in REFUSED_UNLESS:
            raise TypeError(f"unexpected keyword argument '{name}'")
        allowed, why = REFUSED_UNLESS[name]
        if not any(_same(value, ok) for ok in allowed):
            raise NotImplementedError(f"{name}={value!r} is not supported by glmoe: {why}")
    return sorted(n for n, v in options.items() if n in SPEED_ONLY_DEFAULTS and not _same(v, SPEED_ONLY_DEFAULTS[n]))
