"""`llama-server`: llama.cpp's server flags (where they overlap) into Settings, then uvicorn.
Placement flags (-ngl, -ot, -cmoe, -ncmoe) mean what they mean in llama.cpp (common/arg.cpp);
flags that only tune speed there (-fa, -ub, -tb, ...) are accepted so
llama.cpp command lines run unchanged, and reported once as unused; llama.cpp flags that would
change results and that glmoe does not implement are usage errors that say so. llama.cpp's
LLAMA_ARG_* environment variables stand for their flags (cli_env.py). docs/SERVER_API.md lists
every llama.cpp flag and what glmoe does with it."""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from ..llama_options import CACHE_TYPE_HELP, cache_type_arg
from .cli_env import env_arguments
from .settings import Settings

DEFAULT_TIMEOUT_S = 600  # llama.cpp's --timeout: connections.py's read/write timeouts, the body's 408


class _Refused(argparse.Action):
    """A llama.cpp flag glmoe does not implement and that would change results: a usage error
    that says so (rather than argparse's "unrecognized arguments")."""

    def __init__(self, option_strings, dest, reason: str, **kw):
        self.reason = reason
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.reason}")


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"version: glmoe {glmoe_version()}", file=sys.stderr)  # llama.cpp prints its build to stderr
        parser.exit(0)


def glmoe_version() -> str:
    try:
        from importlib.metadata import version

        return version("glmoe")
    except Exception:  # not installed as a distribution (a source tree on sys.path)
        return "unknown"


# Sampling flags (llama.cpp common/arg.cpp) -> the request field they give the default of.
# What llama.cpp's server samples with where neither the request nor a flag says (its common.h), which
# is not OpenAI's temperature 1 with top-k / top-p / min-p off.
LLAMA_SERVER_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
SAMPLING_FLAGS = [  # (flags, request field, type, help)
    (["--temp", "--temperature"], "temperature", float, "temperature (0: greedy)"),
    (["--top-k"], "top_k", int, "top-k sampling (0: off)"),
    (["--top-p"], "top_p", float, "top-p sampling (1.0: off)"),
    (["--min-p"], "min_p", float, "min-p sampling (0.0: off)"),
    (["--typical", "--typical-p"], "typical_p", float, "locally typical sampling, parameter p (1.0: off)"),
    (["--repeat-penalty"], "repeat_penalty", float, "penalize repeated tokens (1.0: off)"),
    (["--repeat-last-n", "--last_n_tokens_size"], "repeat_last_n", int,
     "last n tokens to penalize (0: off, -1: context size)"),
    (["--presence-penalty"], "presence_penalty", float, "repeat alpha presence penalty (0.0: off)"),
    (["--frequency-penalty"], "frequency_penalty", float, "repeat alpha frequency penalty (0.0: off)"),
]

# llama.cpp flags that change results and that glmoe does not implement: (flags, nargs, reason).
NOT_SAMPLER = "glmoe's sampler has no such stage (it has temperature, top-k, top-p, min-p, typical-p and the " \
              "repeat/presence/frequency penalties)"
REFUSED_FLAGS = [
    (["--no-jinja"], 0, "glmoe always renders the chat template with jinja (it has no other template path)"),
    (["-nocb", "--no-cont-batching"], 0, "glmoe always batches requests continuously"),
    (["--mirostat"], 1, NOT_SAMPLER), (["--mirostat-lr"], 1, NOT_SAMPLER), (["--mirostat-ent"], 1, NOT_SAMPLER),
    (["--xtc-probability"], 1, NOT_SAMPLER), (["--xtc-threshold"], 1, NOT_SAMPLER),
    (["--dry-multiplier"], 1, NOT_SAMPLER), (["--dry-base"], 1, NOT_SAMPLER),
    (["--dry-allowed-length"], 1, NOT_SAMPLER), (["--dry-penalty-last-n"], 1, NOT_SAMPLER),
    (["--dry-sequence-breaker"], 1, NOT_SAMPLER), (["--dynatemp-range"], 1, NOT_SAMPLER),
    (["--dynatemp-exp"], 1, NOT_SAMPLER), (["--top-nsigma", "--top-n-sigma"], 1, NOT_SAMPLER),
    (["--samplers"], 1, "glmoe's sampler order is fixed"), (["--sampling-seq", "--sampler-seq"], 1,
                                                             "glmoe's sampler order is fixed"),
    (["-l", "--logit-bias"], 1, "a server-wide logit bias is not supported yet"),
    (["--reasoning-budget-message"], 1, "glmoe ends thinking that runs out of its budget with </think> alone"),
    (["--no-slots"], 0, "glmoe always serves /slots"),
    (["--reranking", "--rerank"], 0, "reranking is not supported"),
    (["--cache-reuse"], 1, "KV cache reuse by shifting is not supported yet"),
    (["--props"], 0, "changing global properties through POST /props is not supported (GET /props is served)"),
    (["--lora"], 1, "LoRA adapters are not supported"), (["--lora-scaled"], 2, "LoRA adapters are not supported"),
    (["--rope-scaling"], 1, "RoPE scaling is not supported"), (["--rope-scale"], 1, "RoPE scaling is not supported"),
    (["--rope-freq-base"], 1, "RoPE scaling is not supported"),
    (["--rope-freq-scale"], 1, "RoPE scaling is not supported"),
    (["--chat_format"], 1, "glmoe formats chats with the GGUF's jinja template (--chat-template replaces it)"),
    (["--context-shift"], 0, "context shifting is not supported (a request stops when its slot is full)"),
]

# Flags that only tune speed or robustness in llama.cpp: accepted, reported once as unused.
UNUSED_REASONS = {
    "ubatch_size": "-ub", "flash_attn": "-fa", "threads_batch": "-tb",
    # llama-cpp-python's `python -m llama_cpp.server` spellings (boolean values)
    "flash_attn_bool": "--flash_attn", "cache": "--cache",
}


def _reasoning_word(text: str) -> str:
    """llama.cpp's --reasoning values: its true / false / auto words."""
    low = text.lower()
    for word, spellings in (("on", ("on", "enabled", "true", "1")), ("off", ("off", "disabled", "false", "0")),
                            ("auto", ("auto", "-1"))):
        if low in spellings:
            return word
    raise argparse.ArgumentTypeError(f"not on, off or auto: {text!r}")


def _bool_word(text: str) -> str:
    """llama-cpp-python's boolean option values (True/False, 1/0, yes/no)."""
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return "True"
    if low in ("false", "0", "no", "off"):
        return "False"
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _load_mode(text: str) -> str:
    """llama.cpp's -lm/--load-mode value, checked by the loader's own reading of it."""
    from .. import _core

    try:
        _core.load_mode_maps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def _bool_value(text: str) -> bool:
    return _bool_word(text) == "True"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llama-server", allow_abbrev=False,
                                 description="OpenAI-compatible server for GLM4-MoE GGUF models")
    ap.add_argument("-m", "--model", help="GGUF file (default: the built-in tiny trained model)")
    ap.add_argument("-a", "--alias", "--model_alias", dest="alias",
                    help="model name reported by /v1/models and in responses")
    ap.add_argument("-c", "--ctx-size", "--n_ctx", dest="ctx_size", type=int, default=4096,
                    help="KV cache size in tokens, shared by the slots (0: the model's training context)")
    ap.add_argument("-np", "--parallel", type=int, default=4, help="slots: requests decoded together")
    ap.add_argument("-t", "--threads", "--n_threads", dest="threads", type=int, default=0,
                    help="CPU threads (0: all)")
    ap.add_argument("-b", "--batch-size", "--n_batch", dest="batch_size", type=int, default=512,
                    help="prompt tokens per decode step")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("-to", "--timeout", type=int, default=DEFAULT_TIMEOUT_S, metavar="N",
                    help="read/write timeout in seconds: a request's head and body must arrive, and a response "
                         "the client stops reading must drain, within N s (default: %(default)s)")
    ap.add_argument("--api-key", "--api_key", dest="api_key",
                    help="require 'Authorization: Bearer KEY' (also from $LLAMA_API_KEY)")
    ap.add_argument("--api-key-file", metavar="FNAME",
                    help="file of API keys, one per line (blank lines and lines starting with # skipped); "
                         "any of them, or --api-key, is accepted")
    ap.add_argument("--ssl-key-file", "--ssl_keyfile", dest="ssl_key_file", metavar="FNAME",
                    help="PEM-encoded SSL private key (with --ssl-cert-file)")
    ap.add_argument("--ssl-cert-file", "--ssl_certfile", dest="ssl_cert_file", metavar="FNAME",
                    help="PEM-encoded SSL certificate (with --ssl-key-file)")
    ap.add_argument("-v", "--verbose", "--log-verbose", dest="verbose", action="store_true",
                    help="log every HTTP request (uvicorn's access log)")
    ap.add_argument("--version", action=_Version, help="print glmoe's version and exit")
    ap.add_argument("--usage", action="help", help="(as -h)")
    ap.add_argument("-n", "--n-predict", "--predict", dest="n_predict", type=int, default=-1, metavar="N",
                    help="tokens to predict for a request that gives no max_tokens, and the most any request gets "
                         "(-1: until the slot's context is full)")
    ap.add_argument("-s", "--seed", type=int, default=None, metavar="SEED",
                    help="sampling seed of requests that give none (-1, the default: a random seed each request)")
    ap.add_argument("--chat-template", help="jinja chat template source (default: the model's)")
    ap.add_argument("--chat-template-file", help="file holding the jinja chat template")
    ap.add_argument("--jinja", action="store_true", help="(the default: templates are always rendered with jinja)")
    ap.add_argument("--chat-template-kwargs", metavar="JSON",
                    help="extra variables for the chat template, a JSON object, e.g. '{\"enable_thinking\": false}' "
                         "(a request's chat_template_kwargs win)")
    ap.add_argument("--reasoning-format", choices=["none", "deepseek", "auto"], default="auto",
                    help="none: GLM's <think> text stays in content; deepseek / auto: it goes to reasoning_content "
                         "(a request's reasoning_format wins)")
    ap.add_argument("-rea", "--reasoning", type=_reasoning_word, default="auto", metavar="on|off|auto",
                    help="thinking in chats: on / off give the template enable_thinking true / false; auto (the "
                         "default): the template's own default")
    ap.add_argument("--reasoning-effort", default="default", metavar="LEVEL",
                    help="the template's reasoning_effort variable (default: unset)")
    ap.add_argument("--reasoning-budget", type=int, default=-1, metavar="N",
                    help="-1: unrestricted thinking; 0: no thinking (the template gets enable_thinking=false); "
                         "N > 0: a chat answer thinks at most N tokens, then </think> is forced")
    grammar = ap.add_argument_group("constrained output: the constraint of requests that set none (as llama.cpp)")
    grammar.add_argument("--grammar", metavar="GRAMMAR", help="GBNF grammar (or llguidance's Lark)")
    grammar.add_argument("--grammar-file", metavar="FNAME", help="file holding the grammar")
    grammar.add_argument("-j", "--json-schema", metavar="SCHEMA", help="JSON schema, e.g. '{\"type\": \"object\"}'")
    grammar.add_argument("-jf", "--json-schema-file", metavar="FILE", help="file holding the JSON schema")
    sampling = ap.add_argument_group("sampling defaults for the fields a request leaves unset (unless given: "
                                     "llama.cpp's --temp 0.8 --top-k 40 --top-p 0.95 --min-p 0.05)")
    for flags, field, typ, text in SAMPLING_FLAGS:
        sampling.add_argument(*flags, dest=field, type=typ, default=None, metavar="N", help=text)
    embed = ap.add_argument_group("embeddings (as llama.cpp)")
    embed.add_argument("--embedding", "--embeddings", dest="embedding", action="store_true",
                       help="serve /embedding, /embeddings and /v1/embeddings (from a second context, made on "
                            "first use; completions are served too)")
    embed.add_argument("--pooling", choices=["none", "mean", "cls", "last", "rank"],
                       help="how an input's token embeddings become one: none (each token's; /v1/embeddings "
                            "refuses it), mean, cls (first token), last (default: the model's, none for GLM)")
    spec = ap.add_argument_group("suffix decoding (glmoe's own flags: llama.cpp has no model-free drafter)")
    spec.add_argument("--spec-suffix", action="store_true",
                      help="draft from text already seen (prompt, output, earlier outputs) and verify in the batch")
    spec.add_argument("--spec-max-depth", type=int, default=64, help="longest context suffix matched")
    spec.add_argument("--spec-max-spec-factor", type=float, default=1.0,
                      help="draft at most this many tokens per matched token")
    spec.add_argument("--spec-min-token-prob", type=float, default=0.1,
                      help="stop a draft where its empirical path probability falls below this")
    gpu = ap.add_argument_group("placement (as llama.cpp)")
    gpu.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", "--n_gpu_layers", dest="gpu_layers", type=int, default=0,
                     metavar="N",
                     help="on the GPU: the output head and the last N-1 layers (-1, or more than the model has: all)")
    gpu.add_argument("-ot", "--override-tensor", action="append", default=[], metavar="PATTERN=BUFFER[,...]",
                     help="tensors whose name matches the regex go to BUFFER (CPU or CUDA0), before -ngl; "
                          "first match wins; repeatable")
    gpu.add_argument("-cmoe", "--cpu-moe", action="store_true", help="keep every MoE expert tensor on the CPU")
    gpu.add_argument("-ncmoe", "--n-cpu-moe", type=int, default=0, metavar="N",
                     help="keep the MoE experts of the first N layers on the CPU")
    gpu.add_argument("--mmap", dest="use_mmap", action="store_true", default=True,
                     help="map the model file (the default)")
    gpu.add_argument("--no-mmap", dest="use_mmap", action="store_false",
                     help="read the model file whole into memory instead of mapping it: the file's size in RAM, "
                          "faster reads for the weights the CPU computes with")
    gpu.add_argument("--use_mmap", dest="use_mmap", type=_bool_value, metavar="BOOL",
                     help="llama-cpp-python's spelling of --mmap / --no-mmap")
    gpu.add_argument("--mlock", dest="use_mlock", action="store_true", default=False,
                     help="lock the model file's bytes (mapped or read) in RAM, so that the kernel does not page "
                          "them out; where mlock fails (RLIMIT_MEMLOCK) a warning is printed and the model loads "
                          "unlocked")
    gpu.add_argument("--use_mlock", dest="use_mlock", type=_bool_value, metavar="BOOL",
                     help="llama-cpp-python's spelling of --mlock")
    gpu.add_argument("-lm", "--load-mode", dest="load_mode", type=_load_mode, default="auto", metavar="MODE",
                     help="llama.cpp's: auto, mmap and mmap+mlock map the file (auto: unless --no-mmap); none, mlock "
                          "and dio read it into memory (--no-mmap); mlock and mmap+mlock also lock it in RAM "
                          "(--mlock)")
    gpu.add_argument("-ctk", "--cache-type-k", dest="cache_type_k", type=cache_type_arg, default=-1, metavar="TYPE",
                     help=CACHE_TYPE_HELP.format("K"))
    gpu.add_argument("-ctv", "--cache-type-v", dest="cache_type_v", type=cache_type_arg, default=-1, metavar="TYPE",
                     help=CACHE_TYPE_HELP.format("V"))
    ap.add_argument("--slot-save-path", metavar="DIR",
                    help="directory for POST /slots/{id}?action=save|restore files (created if missing); with it "
                         "idle slots keep their cache for the next request sharing its prompt prefix")
    unused = ap.add_argument_group("accepted for llama.cpp compatibility, unused")
    unused.add_argument("-ub", "--ubatch-size", type=int)
    unused.add_argument("-fa", "--flash-attn", nargs="?", const="on", choices=["on", "off", "auto"])
    unused.add_argument("-tb", "--threads-batch", "--n_threads_batch", dest="threads_batch", type=int, metavar="N",
                        help="(-t sets all of glmoe's threads)")
    lcp = ap.add_argument_group("llama-cpp-python server spellings (speed only: accepted, unused)")
    for flag, dest in [("--flash_attn", "flash_attn_bool"), ("--cache", "cache")]:
        lcp.add_argument(flag, dest=dest, type=_bool_word, metavar="BOOL")
    unused.add_argument("--metrics", action="store_true", help="(/metrics is always on)")
    unused.add_argument("--slots", action="store_true", help="(/slots is always on)")
    unused.add_argument("-cb", "--cont-batching", action="store_true", help="(always on)")
    unused.add_argument("--no-warmup", action="store_true", help="(glmoe runs no warm-up step)")
    unused.add_argument("--warmup", action="store_true", help="(glmoe runs no warm-up step: only speed differs)")
    unused.add_argument("--no-context-shift", action="store_true", help="(glmoe never shifts the context)")
    for flags, nargs, reason in REFUSED_FLAGS:
        ap.add_argument(*flags, action=_Refused, nargs=nargs, reason=reason)
    return ap


def read_api_keys(path: str):
    """llama.cpp's --api-key-file: one key per line; empty lines and lines starting with # skipped."""
    with open(path, encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line and not line.startswith("#")]


def template_kwargs(args: argparse.Namespace) -> dict:
    """--chat-template-kwargs, then -rea on / off as enable_thinking, --reasoning-effort as
    reasoning_effort and --reasoning-budget 0 as enable_thinking=false (as llama.cpp does for
    templates that read enable_thinking, GLM's among them); the JSON's own keys win."""
    kwargs = json.loads(args.chat_template_kwargs) if args.chat_template_kwargs else {}
    if args.reasoning != "auto":
        kwargs.setdefault("enable_thinking", args.reasoning == "on")
    if args.reasoning_effort != "default":
        kwargs.setdefault("reasoning_effort", args.reasoning_effort)
    if args.reasoning_budget == 0:
        kwargs.setdefault("enable_thinking", False)
    return kwargs


GRAMMAR_FLAGS = (("grammar", "--grammar"), ("grammar_file", "--grammar-file"), ("json_schema", "--json-schema"),
                 ("json_schema_file", "--json-schema-file"))


def default_grammar(args: argparse.Namespace):
    """The LlamaGrammar of --grammar / --grammar-file / -j / -jf (one at most), or None; a
    GrammarError or OSError when it cannot be read or built."""
    from ..grammar import LlamaGrammar

    if args.grammar is not None:
        return LlamaGrammar.from_string(args.grammar, verbose=False)
    if args.grammar_file is not None:
        return LlamaGrammar.from_file(args.grammar_file, verbose=False)
    if args.json_schema is not None:
        return LlamaGrammar.from_json_schema(args.json_schema, verbose=False)
    if args.json_schema_file is not None:
        with open(args.json_schema_file, encoding="utf-8") as f:
            return LlamaGrammar.from_json_schema(f.read(), verbose=False)
    return None


def settings_from_args(args: argparse.Namespace) -> Settings:
    template = args.chat_template
    if args.chat_template_file:
        with open(args.chat_template_file, encoding="utf-8") as f:
            template = f.read()
    if args.model:
        model = args.model
    else:
        from ..__main__ import default_model_path
        model = default_model_path()
    sampling = dict(LLAMA_SERVER_SAMPLING)
    sampling.update({field: getattr(args, field) for _, field, _, _ in SAMPLING_FLAGS
                     if getattr(args, field) is not None})
    if args.seed is not None:
        sampling["seed"] = args.seed
    from .. import _core

    # An explicit -lm mode wins over --mmap/--no-mmap, which decide `auto`; mlock in the mode, or --mlock, locks.
    use_mmap = args.use_mmap if args.load_mode == "auto" else _core.load_mode_maps(args.load_mode)
    use_mlock = args.use_mlock or _core.load_mode_locks(args.load_mode)
    return Settings(model_path=model, n_ctx=args.ctx_size, n_parallel=args.parallel, n_threads=args.threads,
                    n_batch=args.batch_size, n_gpu_layers=args.gpu_layers, use_mmap=use_mmap, use_mlock=use_mlock,
                    tensor_overrides=list(args.override_tensor), cpu_moe=args.cpu_moe, n_cpu_moe=args.n_cpu_moe,
                    type_k=args.cache_type_k, type_v=args.cache_type_v, slot_save_path=args.slot_save_path,
                    alias=args.alias,
                    api_key=args.api_key, chat_template=template,
                    api_keys=read_api_keys(args.api_key_file) if args.api_key_file else [],
                    n_predict=args.n_predict, sampling_defaults=sampling, reasoning_format=args.reasoning_format,
                    chat_template_kwargs=template_kwargs(args), embedding=args.embedding, pooling=args.pooling,
                    reasoning_budget=args.reasoning_budget, default_grammar=default_grammar(args),
                    spec_suffix=args.spec_suffix, spec_max_depth=args.spec_max_depth,
                    spec_max_spec_factor=args.spec_max_spec_factor, spec_min_token_prob=args.spec_min_token_prob)


def check_overrides(ap: argparse.ArgumentParser, values) -> None:
    """A malformed -ot value is a usage error before the model loads, as in llama.cpp (whether each
    pattern matches a tensor of the model is checked when it loads)."""
    from .. import _core

    for value in values:
        try:
            _core.parse_tensor_overrides(value)
        except ValueError as e:
            ap.error(str(e))


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The usage errors llama.cpp gives before it loads anything (and those of glmoe's limits)."""
    if args.parallel < 1 or args.ctx_size < 0 or args.batch_size < 1:
        ap.error("--parallel and --batch-size must be >= 1, --ctx-size >= 0")
    if args.spec_max_depth < 1 or not args.spec_max_spec_factor >= 0 or not 0 <= args.spec_min_token_prob <= 1:
        ap.error("--spec-max-depth must be >= 1, --spec-max-spec-factor >= 0, --spec-min-token-prob in [0, 1]")
    if args.n_cpu_moe < 0:
        ap.error("--n-cpu-moe must be >= 0")
    if args.timeout < 1:
        ap.error("--timeout must be >= 1 (seconds)")
    if not 0 <= args.port <= 65535:
        ap.error(f"--port {args.port}: a port is 0 to 65535")
    if args.model and not os.path.isfile(args.model):
        ap.error(f"no such model file: {args.model}")
    if args.n_predict < -1 or args.n_predict == 0:
        ap.error("--n-predict must be -1 (until the context is full) or >= 1")
    if args.pooling == "rank":
        ap.error("--pooling rank: reranking is not supported")
    if args.reasoning_budget < -1:
        ap.error("--reasoning-budget: -1 (unrestricted), 0 (no thinking) or a number of tokens")
    if args.reasoning_budget == 0 and args.reasoning == "on":
        ap.error("--reasoning on and --reasoning-budget 0 contradict each other")
    given = [flag for dest, flag in GRAMMAR_FLAGS if getattr(args, dest) is not None]
    if len(given) > 1:
        ap.error(f"{given[0]} and {given[1]}: give one grammar or schema")
    try:
        default_grammar(args)
    except (ValueError, OSError) as e:  # GrammarError is a ValueError
        ap.error(f"{given[0]}: {e}")
    if args.chat_template_kwargs is not None:
        try:
            kwargs = json.loads(args.chat_template_kwargs)
        except ValueError as e:
            ap.error(f"--chat-template-kwargs: not JSON: {e}")
        if not isinstance(kwargs, dict):
            ap.error("--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    if bool(args.ssl_key_file) != bool(args.ssl_cert_file):
        ap.error("--ssl-key-file and --ssl-cert-file go together")
    for flag, path in [("--ssl-key-file", args.ssl_key_file), ("--ssl-cert-file", args.ssl_cert_file),
                       ("--api-key-file", args.api_key_file), ("--chat-template-file", args.chat_template_file)]:
        if path and not os.path.isfile(path):
            ap.error(f"{flag}: no such file: {path}")
    if args.api_key_file and not read_api_keys(args.api_key_file):
        ap.error(f"--api-key-file: no key in {args.api_key_file}")
    sampling = {field: getattr(args, field) for _, field, _, _ in SAMPLING_FLAGS if getattr(args, field) is not None}
    if args.seed is not None:
        sampling["seed"] = args.seed
    if sampling:
        import pydantic

        from .schemas import SamplingFields

        try:
            SamplingFields(**sampling)
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            flag = next(f[0] for f, field, _, _ in SAMPLING_FLAGS + [(["--seed"], "seed", int, "")]
                        if field == err["loc"][0])
            ap.error(f"{flag}: {err['msg']}")
    check_overrides(ap, args.override_tensor)
    if args.slot_save_path is not None:
        if not args.slot_save_path:
            ap.error("--slot-save-path: give a directory")
        try:
            os.makedirs(args.slot_save_path, exist_ok=True)
        except OSError as e:
            ap.error(f"--slot-save-path {args.slot_save_path}: not a usable directory: {e.strerror or e}")


def unused_flags(args: argparse.Namespace) -> str:
    """The llama.cpp flags given that only tune speed in llama.cpp and that glmoe does not use."""
    parts = []
    for dest, flag in UNUSED_REASONS.items():
        value = getattr(args, dest)
        if value is None or value is False:
            continue
        parts.append(flag if value is True else f"{flag} {value}")
    return ", ".join(parts)


def listen_socket(host: str, port: int) -> socket.socket:
    """The bound socket uvicorn serves on (as uvicorn's Config.bind_socket, without its sys.exit):
    bound before the model loads, so that a busy port is a clean error at once. Its protocol is
    named (IPPROTO_TCP): asyncio turns Nagle's algorithm off only on the connections of such a
    socket, and with it on, each streamed chunk after the response head waited for the client's
    delayed ACK (~40 ms on a kept-alive connection)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv=None) -> int:
    ap = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(env_arguments(ap, argv, os.environ) + argv)
    check_args(ap, args)
    unused = unused_flags(args)
    if unused:
        print(f"llama-server: not using {unused} (they only tune speed in llama.cpp)", file=sys.stderr)
    from . import connections, limits
    from .app import create_app

    try:
        sock = listen_socket(args.host, args.port)
    except OSError as e:  # busy port, unknown host, no permission
        print(f"llama-server: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    settings = settings_from_args(args)
    failed = []

    def on_load_failure(message: str) -> None:  # llama.cpp exits when the model does not load
        failed.append(message)
        server.should_exit = True

    settings.on_load_failure = on_load_failure
    ssl = dict(ssl_keyfile=args.ssl_key_file, ssl_certfile=args.ssl_cert_file) if args.ssl_key_file else {}
    limits.set_body_read_timeout(args.timeout)
    server = connections.server(create_app(settings), timeout_s=args.timeout, verbose=args.verbose, host=args.host,
                                port=args.port, **ssl)
    scheme = "https" if ssl else "http"
    print(f"llama-server: listening on {scheme}://{args.host}:{args.port}", file=sys.stderr)
    server.run(sockets=[sock])
    if failed:
        print(f"llama-server: exiting: the model failed to load: {failed[0]}", file=sys.stderr)
        return 1
    return 0
