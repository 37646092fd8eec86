"""`llama-server`: llama.cpp's server flags (where they overlap) into Settings, then uvicorn.
Placement flags (-ngl, -ot, -cmoe, -ncmoe) mean what they mean in llama.cpp; -fa and -ub are
accepted so llama.cpp command lines run unchanged, and reported as unused."""
from __future__ import annotations

import argparse
import os
import sys

from .settings import Settings


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llama-server", allow_abbrev=False,
                                 description="OpenAI-compatible server for GLM4-MoE GGUF models")
    ap.add_argument("-m", "--model", help="GGUF file (default: the built-in tiny trained model)")
    ap.add_argument("-a", "--alias", help="model name reported by /v1/models and in responses")
    ap.add_argument("-c", "--ctx-size", type=int, default=4096,
                    help="KV cache size in tokens, shared by the slots (0: the model's training context)")
    ap.add_argument("-np", "--parallel", type=int, default=4, help="slots: requests decoded together")
    ap.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (0: all)")
    ap.add_argument("-b", "--batch-size", type=int, default=512, help="prompt tokens per decode step")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--api-key", default=os.environ.get("LLAMA_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (also from $LLAMA_API_KEY)")
    ap.add_argument("--chat-template", help="jinja chat template source (default: the model's)")
    ap.add_argument("--chat-template-file", help="file holding the jinja chat template")
    spec = ap.add_argument_group("suffix decoding (glmoe's own flags: llama.cpp has no model-free drafter)")
    spec.add_argument("--spec-suffix", action="store_true",
                      help="draft from text already seen (prompt, output, earlier outputs) and verify in the batch")
    spec.add_argument("--spec-max-depth", type=int, default=64, help="longest context suffix matched")
    spec.add_argument("--spec-max-spec-factor", type=float, default=1.0,
                      help="draft at most this many tokens per matched token")
    spec.add_argument("--spec-min-token-prob", type=float, default=0.1,
                      help="stop a draft where its empirical path probability falls below this")
    gpu = ap.add_argument_group("placement (as llama.cpp)")
    gpu.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", dest="gpu_layers", type=int, default=0, metavar="N",
                     help="on the GPU: the output head and the last N-1 layers (-1, or more than the model has: all)")
    gpu.add_argument("-ot", "--override-tensor", action="append", default=[], metavar="PATTERN=BUFFER[,...]",
                     help="tensors whose name matches the regex go to BUFFER (CPU or CUDA0), before -ngl; "
                          "first match wins; repeatable")
    gpu.add_argument("-cmoe", "--cpu-moe", action="store_true", help="keep every MoE expert tensor on the CPU")
    gpu.add_argument("-ncmoe", "--n-cpu-moe", type=int, default=0, metavar="N",
                     help="keep the MoE experts of the first N layers on the CPU")
    unused = ap.add_argument_group("accepted for llama.cpp compatibility, unused")
    unused.add_argument("-ub", "--ubatch-size", type=int)
    unused.add_argument("-fa", "--flash-attn", nargs="?", const="on", choices=["on", "off", "auto"])
    unused.add_argument("--metrics", action="store_true", help="(/metrics is always on)")
    unused.add_argument("--slots", action="store_true", help="(/slots is always on)")
    return ap


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
    return Settings(model_path=model, n_ctx=args.ctx_size, n_parallel=args.parallel, n_threads=args.threads,
                    n_batch=args.batch_size, n_gpu_layers=args.gpu_layers,
                    tensor_overrides=list(args.override_tensor), cpu_moe=args.cpu_moe, n_cpu_moe=args.n_cpu_moe,
                    alias=args.alias, api_key=args.api_key, chat_template=template,
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


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.parallel < 1 or args.ctx_size < 0 or args.batch_size < 1:
        ap.error("--parallel and --batch-size must be >= 1, --ctx-size >= 0")
    if args.spec_max_depth < 1 or not args.spec_max_spec_factor >= 0 or not 0 <= args.spec_min_token_prob <= 1:
        ap.error("--spec-max-depth must be >= 1, --spec-max-spec-factor >= 0, --spec-min-token-prob in [0, 1]")
    if args.n_cpu_moe < 0:
        ap.error("--n-cpu-moe must be >= 0")
    if args.model and not os.path.isfile(args.model):
        ap.error(f"no such model file: {args.model}")
    check_overrides(ap, args.override_tensor)
    unused = {f: getattr(args, d) for f, d in [("-ub", "ubatch_size"), ("-fa", "flash_attn")]
              if getattr(args, d) is not None}
    if unused:
        print("llama-server: not using " + ", ".join(f"{k} {v}" for k, v in unused.items()),
              file=sys.stderr)
    import uvicorn

    from .app import create_app

    settings = settings_from_args(args)
    print(f"llama-server: listening on http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0
