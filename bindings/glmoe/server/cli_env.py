"""llama.cpp's environment variables for llama-server's flags (common/arg.cpp's set_env names):
each set variable becomes its flag, put before the command line's arguments, unless the command
line gives that flag itself (the command line wins, as in llama.cpp). A LLAMA_ARG_* variable that
names a flag glmoe lacks, or one it refuses, is a usage error, as the flag would be."""
from __future__ import annotations

import argparse
from typing import List, Mapping, Optional, Sequence, Tuple

# Variable -> the flag its value is given to.
VALUE_FLAGS = {
    "LLAMA_ARG_MODEL": "--model", "LLAMA_ARG_ALIAS": "--alias", "LLAMA_ARG_CTX_SIZE": "--ctx-size",
    "LLAMA_ARG_N_PARALLEL": "--parallel", "LLAMA_ARG_THREADS": "--threads", "LLAMA_ARG_BATCH": "--batch-size",
    "LLAMA_ARG_UBATCH": "--ubatch-size", "LLAMA_ARG_N_PREDICT": "--n-predict", "LLAMA_ARG_HOST": "--host",
    "LLAMA_ARG_PORT": "--port", "LLAMA_ARG_TIMEOUT": "--timeout", "LLAMA_API_KEY": "--api-key",
    "LLAMA_ARG_API_KEY_FILE": "--api-key-file", "LLAMA_ARG_SSL_KEY_FILE": "--ssl-key-file",
    "LLAMA_ARG_SSL_CERT_FILE": "--ssl-cert-file", "LLAMA_ARG_CHAT_TEMPLATE": "--chat-template",
    "LLAMA_ARG_CHAT_TEMPLATE_FILE": "--chat-template-file", "LLAMA_ARG_CHAT_TEMPLATE_KWARGS": "--chat-template-kwargs",
    "LLAMA_ARG_THINK": "--reasoning-format", "LLAMA_ARG_REASONING": "--reasoning",
    "LLAMA_ARG_REASONING_EFFORT": "--reasoning-effort", "LLAMA_ARG_THINK_BUDGET": "--reasoning-budget",
    "LLAMA_ARG_THINK_BUDGET_MESSAGE": "--reasoning-budget-message",
    "LLAMA_ARG_TEMPERATURE": "--temp", "LLAMA_ARG_TOP_K": "--top-k", "LLAMA_ARG_TOP_P": "--top-p",
    "LLAMA_ARG_MIN_P": "--min-p", "LLAMA_ARG_REPEAT_PENALTY": "--repeat-penalty",
    "LLAMA_ARG_PRESENCE_PENALTY": "--presence-penalty", "LLAMA_ARG_FREQUENCY_PENALTY": "--frequency-penalty",
    "LLAMA_ARG_POOLING": "--pooling", "LLAMA_ARG_N_GPU_LAYERS": "--gpu-layers",
    "LLAMA_ARG_OVERRIDE_TENSOR": "--override-tensor", "LLAMA_ARG_N_CPU_MOE": "--n-cpu-moe",
    "LLAMA_ARG_CACHE_TYPE_K": "--cache-type-k", "LLAMA_ARG_CACHE_TYPE_V": "--cache-type-v",
    "LLAMA_ARG_SLOT_SAVE_PATH": "--slot-save-path", "LLAMA_ARG_LOAD_MODE": "--load-mode",
    "LLAMA_ARG_FLASH_ATTN": "--flash-attn", "LLAMA_ARG_CACHE_REUSE": "--cache-reuse",
    "LLAMA_ARG_ROPE_SCALING_TYPE": "--rope-scaling", "LLAMA_ARG_ROPE_SCALE": "--rope-scale",
    "LLAMA_ARG_ROPE_FREQ_BASE": "--rope-freq-base", "LLAMA_ARG_ROPE_FREQ_SCALE": "--rope-freq-scale",
}
# Variable -> (flag for a true value, flag for a false one; None: a false value does nothing). For
# a pair, llama.cpp also reads LLAMA_ARG_NO_<NAME> as false.
SWITCHES = {
    "LLAMA_ARG_CPU_MOE": ("--cpu-moe", None), "LLAMA_ARG_EMBEDDINGS": ("--embedding", None),
    "LLAMA_ARG_ENDPOINT_METRICS": ("--metrics", None), "LLAMA_ARG_ENDPOINT_PROPS": ("--props", None),
    "LLAMA_ARG_RERANKING": ("--reranking", None), "LLAMA_ARG_MLOCK": ("--mlock", None),
    "LLAMA_ARG_CONT_BATCHING": ("--cont-batching", "--no-cont-batching"),
    "LLAMA_ARG_MMAP": ("--mmap", "--no-mmap"),
    "LLAMA_ARG_CONTEXT_SHIFT": ("--context-shift", "--no-context-shift"),
    "LLAMA_ARG_JINJA": ("--jinja", "--no-jinja"), "LLAMA_ARG_ENDPOINT_SLOTS": ("--slots", "--no-slots"),
}
TRUE_WORDS, FALSE_WORDS = ("on", "enabled", "true", "1"), ("off", "disabled", "false", "0")


def _given(ap: argparse.ArgumentParser, flags: Sequence[Optional[str]], argv: Sequence[str]) -> bool:
    """Whether argv gives any spelling of the flags (their actions' option strings)."""
    spellings = {s for f in flags if f for s in ap._option_string_actions[f].option_strings}
    for arg in argv:
        if arg == "--":
            break
        if arg in ap._option_string_actions:
            name = arg
        elif arg.startswith("--"):
            name = arg.split("=", 1)[0]
        else:
            name = arg[:2]  # a short flag with its value attached: "-c4096"
        if name in spellings:
            return True
    return False


def _switch_value(value: str, negated: bool) -> Optional[bool]:
    if negated:
        return False
    low = value.lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    return None


def _refusal(ap: argparse.ArgumentParser, flag: str) -> Optional[str]:
    return getattr(ap._option_string_actions[flag], "reason", None)  # cli._Refused's


def env_arguments(ap: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str]) -> List[str]:
    """The arguments environ's llama.cpp variables stand for (before argv's own); ap.error() for a
    variable glmoe cannot honour."""
    out: List[str] = []
    known = set(VALUE_FLAGS) | set(SWITCHES)
    known |= {name.replace("LLAMA_ARG_", "LLAMA_ARG_NO_", 1) for name, (_, off) in SWITCHES.items() if off}
    unknown = sorted(name for name in environ if name.startswith("LLAMA_ARG_") and name not in known)
    if unknown:
        ap.error(f"{unknown[0]} is set: llama.cpp's variable for a flag glmoe does not have (unset it)")

    def add(name: str, flag: str, value: Optional[str]) -> None:
        reason = _refusal(ap, flag)
        if reason is not None:
            ap.error(f"{name} ({flag}): {reason}")
        out.append(flag if value is None else f"{flag}={value}")  # "=": a value may start with "-"

    for name, flag in VALUE_FLAGS.items():
        if name in environ and not _given(ap, [flag], argv):
            add(name, flag, environ[name])
    for name, (on, off) in SWITCHES.items():
        negative = name.replace("LLAMA_ARG_", "LLAMA_ARG_NO_", 1) if off else None
        settings: List[Tuple[str, str, bool]] = [(name, environ[name], False)] if name in environ else []
        if negative is not None and negative in environ:
            settings.append((negative, environ[negative], True))
        if not settings or _given(ap, [on, off], argv):
            continue
        var, value, negated = settings[-1]
        state = _switch_value(value, negated)
        if state is None:
            ap.error(f"{var}={value!r}: not a boolean ({', '.join(TRUE_WORDS)} or {', '.join(FALSE_WORDS)})")
        flag = on if state else off
        if flag is not None:
            add(var, flag, None)
    return out
