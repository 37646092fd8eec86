"""Train the tiny GLM4-MoE shipped as bindings/glmoe/models/tiny-kjv.gguf (not run by CI).

    apt-get install bible-kjv bible-kjv-text   # Debian: the King James Version, public domain
    python tools/train_tiny.py [--minutes 15] [--out bindings/glmoe/models/tiny-kjv.gguf] [--head-dim 48]

with glmoe importable (its tokenizer encodes the corpus) and torch + transformers installed.

The text comes from Debian's bible-kjv-text through its reader (`bible`), one verse per line.
`--copy-fraction 0.5` mixes in passages quoted back with small edits (a model that copies from
its context, for benchmarking suffix decoding); `--device cuda` trains on a GPU.
Jude and Revelation are held out of training: tests measure perplexity on them
(tests/data/kjv_heldout.txt is the start of Revelation), which only a trained model can keep low,
so a wrong rope or mask in the engine shows up as a jump in perplexity.

Steps: a byte-level BPE with GLM-4's pre-tokenizer and special tokens; transformers'
Glm4MoeForCausalLM at a tiny size, trained with AdamW on CPU for a fixed wall-time budget;
conversion with convert_hf, carrying the trained tokenizer into the GGUF.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert_hf  # noqa: E402
from make_model import GLM_SPECIAL_TOKENS  # noqa: E402

HELD_OUT_BOOKS = ("Jude", "Revelation")
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

CONFIG = dict(
    hidden_size=192, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=48, partial_rotary_factor=0.5,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, use_qk_norm=False,
    attention_bias=True, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=1024,
)


def read_kjv(saved: str | None = None) -> tuple[str, str]:
    """(training text, held-out text): verses one a line, books in canonical order. `saved`: the
    reader's output kept in a file, for a machine without the package."""
    # A wide line so each verse is one line; headings are "Book N", verses "  N text".
    if saved:
        with open(saved) as f:
            raw = f.read()
    else:
        raw = subprocess.run(["bible", "-l100000", "gen1:1-rev22:21"], check=True, capture_output=True,
                             text=True).stdout
    train, held, book = [], [], None
    for line in raw.splitlines():
        heading = re.fullmatch(r"(\S.*) \d+", line)
        verse = re.fullmatch(r"\s+\d+ (.*)", line)
        if heading:
            book = heading.group(1)
        elif verse:
            (held if book in HELD_OUT_BOOKS else train).append(verse.group(1).strip())
    return "\n".join(train) + "\n", "\n".join(held) + "\n"


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE as GGUFTokenizer runs it; returns (tokens, types, merges) in GGUF form."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from glmoe.tokenizer import GLM4_PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(GLM_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    model = json.loads(tok.to_str())["model"]
    # Vocab strings are already in GPT-2's byte alphabet, as llama.cpp's GGUFs store them.
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [1] * len(tokens) + [3] * len(GLM_SPECIAL_TOKENS)  # normal, then control specials
    return tokens + GLM_SPECIAL_TOKENS, types, merges


def quoting_sequence(ids: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A passage, some text, then the passage again with a few tokens replaced: the quote-it-back
    pattern of agent transcripts. The passage is corpus tokens in random order, which no amount
    of memorising the corpus predicts, so only copying from the context lowers its loss."""
    n = int(rng.integers(16, length // 2))
    gap = int(rng.integers(0, length - 2 * n + 1))
    b = int(rng.integers(0, len(ids) - length))
    passage = ids[rng.integers(0, len(ids), n)]
    quote = passage.copy()
    edits = rng.integers(0, n, int(rng.integers(0, 3)))
    quote[edits] = ids[rng.integers(0, len(ids), len(edits))]
    seq = np.concatenate([passage, ids[b:b + gap], quote, ids[b + gap:b + length]])
    return seq[:length]


def training_sequence(ids: np.ndarray, length: int, copy_fraction: float, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < copy_fraction:
        return quoting_sequence(ids, length, rng)
    a = int(rng.integers(0, len(ids) - length))
    return ids[a:a + length]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "bindings", "glmoe", "models", "tiny-kjv.gguf"))
    ap.add_argument("--minutes", type=float, default=15.0, help="training wall-time budget")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--outtype", default="f16")
    ap.add_argument("--head-dim", type=int, default=CONFIG["head_dim"],
                    help="attention head size (the GPU kernels take 64, 128 or 256)")
    ap.add_argument("--copy-fraction", type=float, default=0.0,
                    help="share of training sequences that quote an earlier passage with small edits")
    ap.add_argument("--kjv-text", help="the output of `bible -l100000 gen1:1-rev22:21`, saved (default: run it)")
    ap.add_argument("--device", default="cpu", help="where torch trains (cpu, cuda)")
    ap.add_argument("--hf-dir", help="keep the transformers checkpoint here (default: a temp dir)")
    args = ap.parse_args(argv)

    import torch
    import transformers
    from glmoe.tokenizer import GGUFTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    train_text, held_text = read_kjv(args.kjv_text)
    print(f"text: {len(train_text)} bytes train, {len(held_text)} held out", flush=True)

    tokens, types, merges = train_tokenizer(train_text, args.vocab)
    eos = tokens.index("<|endoftext|>")
    # Encode with the engine's own tokenizer, so the model is trained on exactly its ids.
    gt = GGUFTokenizer(tokens, types, merges, eos_id=eos)
    sample = held_text[:5000].encode()
    assert gt.detokenize(gt.tokenize(sample, add_bos=False)) == sample
    train_ids = np.array(gt.tokenize(train_text.encode(), add_bos=False), dtype=np.int64)
    held_ids = np.array(gt.tokenize(held_text.encode(), add_bos=False), dtype=np.int64)
    print(f"tokens: {len(tokens)} vocab, {len(train_ids)} train, {len(held_ids)} held out "
          f"({len(train_text) / len(train_ids):.2f} bytes/token)", flush=True)

    counts = np.bincount(train_ids, minlength=len(tokens)) + 1.0  # add-one: no zero probability
    unigram_ppl = float(np.exp(-np.mean(np.log(counts / counts.sum())[held_ids])))

    cfg = transformers.Glm4MoeConfig(vocab_size=len(tokens), eos_token_id=eos, pad_token_id=eos,
                                     bos_token_id=tokens.index("[gMASK]"), **dict(CONFIG, head_dim=args.head_dim))
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "eager"  # grouped_mm is not available on every CPU build
    model = transformers.Glm4MoeForCausalLM(cfg).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    budget, warmup = args.minutes * 60.0, 30
    start, step = time.time(), 0
    model.train()
    while (elapsed := time.time() - start) < budget:
        # Cosine decay over the time budget (the step count is not known ahead).
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.from_numpy(np.stack([training_sequence(train_ids, args.seq + 1, args.copy_fraction, rng)
                                       for _ in range(args.batch)])).to(args.device)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0:
            print(f"step {step} {elapsed:.0f}s loss {loss.item():.3f} lr {lr:.2e}", flush=True)

    model.eval()
    with torch.no_grad():
        n = (len(held_ids) - 1) // args.seq * args.seq
        x = torch.from_numpy(held_ids[:n + 1]).to(args.device)
        losses = []
        for a in range(0, n, args.seq * 16):
            xs = torch.stack([x[b:b + args.seq + 1] for b in range(a, min(n, a + args.seq * 16), args.seq)])
            lg = model(input_ids=xs[:, :-1]).logits
            losses.append(torch.nn.functional.cross_entropy(
                lg.reshape(-1, lg.shape[-1]), xs[:, 1:].reshape(-1), reduction="sum").item())
        held_ppl = math.exp(sum(losses) / n)
        prompt = torch.tensor([gt.tokenize(b"In the beginning", add_bos=False)], device=args.device)
        out = model.generate(prompt, max_new_tokens=40, do_sample=False)
    print(f"steps {step}, final loss {loss.item():.3f}; held-out perplexity {held_ppl:.1f} "
          f"(unigram {unigram_ppl:.1f})", flush=True)
    print("sample:", gt.detokenize(out[0].tolist()).decode(errors="replace"), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = args.hf_dir or tmp
        model.to("cpu").save_pretrained(hf_dir)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        convert_hf.convert(hf_dir, args.out, args.outtype, vocab=(tokens, types, merges))
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
