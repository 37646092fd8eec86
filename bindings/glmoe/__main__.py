"""`python -m glmoe`: generate text from a prompt with a GLM4-MoE GGUF model.

With no model argument it uses the built-in tiny GLM4-MoE (models/tiny-kjv.gguf, a few MB, made
by tools/train_tiny.py on the King James Bible), so a fresh install writes readable if
scriptural English: it shows the whole path (tokenizer, engine, sampler, streaming) working.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .llama import Llama
from .llama_options import CACHE_TYPE_HELP, cache_type_arg


def default_model_path() -> str:
    """The packaged trained model."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "tiny-kjv.gguf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="glmoe", description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", help="GLM4-MoE GGUF file (default: the built-in tiny model)")
    ap.add_argument("-p", "--prompt", default="In the beginning", help="prompt text")
    ap.add_argument("-n", "--n-predict", type=int, default=32, help="tokens to generate")
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("-s", "--seed", type=int, default=None)
    ap.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", dest="n_gpu_layers", type=int, default=0, metavar="N",
                    help="on the GPU, as llama.cpp: the output head and the last N-1 layers (-1: all)")
    ap.add_argument("-ot", "--override-tensor", action="append", default=[], metavar="PATTERN=BUFFER[,...]",
                    help="tensors whose name matches the regex go to BUFFER (CPU or CUDA0); repeatable")
    ap.add_argument("-cmoe", "--cpu-moe", action="store_true", help="keep every MoE expert tensor on the CPU")
    ap.add_argument("-ncmoe", "--n-cpu-moe", type=int, default=0, metavar="N",
                    help="keep the MoE experts of the first N layers on the CPU")
    ap.add_argument("-ctk", "--cache-type-k", type=cache_type_arg, default=None, metavar="TYPE",
                    help=CACHE_TYPE_HELP.format("K"))
    ap.add_argument("-ctv", "--cache-type-v", type=cache_type_arg, default=None, metavar="TYPE",
                    help=CACHE_TYPE_HELP.format("V"))
    ap.add_argument("--no-mmap", dest="use_mmap", action="store_false",
                    help="read the model file whole into memory instead of mapping it")
    ap.add_argument("--mlock", dest="use_mlock", action="store_true",
                    help="lock the model file's bytes in RAM so that the kernel does not page them out (a warning "
                         "where mlock fails)")
    args = ap.parse_args(argv)

    try:
        llm = Llama(args.model or default_model_path(), n_ctx=args.ctx_size, n_threads=args.threads,
                    n_gpu_layers=args.n_gpu_layers, tensor_overrides=args.override_tensor, cpu_moe=args.cpu_moe,
                    n_cpu_moe=args.n_cpu_moe, type_k=args.cache_type_k, type_v=args.cache_type_v,
                    use_mmap=args.use_mmap, use_mlock=args.use_mlock, verbose=True)
    except ValueError as e:  # a bad -ot value or placement, a KV type the layers cannot store
        ap.error(str(e))
    llm.verbose = False  # the load summary is printed; the timing line below follows the text
    sys.stdout.write(args.prompt)
    t0 = time.perf_counter()
    n_generated = 0
    for chunk in llm(args.prompt, max_tokens=args.n_predict, temperature=args.temp, seed=args.seed, stream=True):
        sys.stdout.write(chunk["choices"][0]["text"])
        sys.stdout.flush()
        n_generated = llm.n_tokens
    seconds = time.perf_counter() - t0
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"glmoe: {n_generated} tokens in context after {1000 * seconds:.1f} ms of prompt processing and generation",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
