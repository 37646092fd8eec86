"""GGUFTokenizer against an HF reference tokenizer built from the same trained vocabulary.

A byte-level BPE is trained here on a varied corpus with the glm4 pre-tokenizer, written into a
GGUF the way llama.cpp's converter writes a GLM tokenizer, and read back by GGUFTokenizer. The
reference is the trained HF tokenizer itself, switched to ignore_merges as llama.cpp's glm4
pre-tokenizer requires, with the GLM control tokens as special added tokens.
"""

import json

import gguf
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from glmoe.tokenizer import (GLM4_PRETOKENIZE_REGEX, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED,
                             GGUFTokenizer, StreamDecoder, decode_input_like_llama,
                             read_tokenizer_metadata)
from glmoe.tools.make_model import ARCH, GLM_SPECIAL_TOKENS, ModelSpec, add_glm4moe_metadata

CODE = '''\
def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    a, b = 0, 1
    out = []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out

class Matrix:
    def __init__(self, rows, cols):
        self.data = [[0.0] * cols for _ in range(rows)]

#include <stdio.h>
#include <stdlib.h>
static int compare(const void *a, const void *b) {
\treturn (*(const int *)a > *(const int *)b) - (*(const int *)a < *(const int *)b);
}
int main(int argc, char **argv) {
\tint values[] = {42, 7, 1999, -3, 0x1F};
\tqsort(values, 5, sizeof(int), compare);
\tfor (size_t i = 0; i < 5; ++i) printf("%d\\n", values[i]);
\treturn EXIT_SUCCESS;
}
'''
PROSE = (
    "The quick brown fox jumps over the lazy dog. It's a sentence we've all seen, isn't it? "
    "They'll say you'd better learn the model's tokenizer before you're done.\n"
    "In 1969, 3 astronauts flew 384400 km to the Moon; the trip took 76 hours and 12 minutes.\n"
    "Mixture-of-experts models route each token to a few experts, chosen by a learned router.\n"
)
CJK = (
    "机器学习是人工智能的一个分支。大型语言模型可以生成文本、翻译语言和回答问题。\n"
    "今天天气很好，我们去公园散步吧！北京、上海和深圳都是中国的大城市。\n"
    "日本語のテキストも含まれています。ひらがな、カタカナ、漢字を使います。東京は日本の首都です。\n"
    "한국어 문장도 있습니다. 서울은 대한민국의 수도입니다. 안녕하세요, 만나서 반갑습니다.\n"
)
EMOJI = (
    "Great job! 🎉🎉 Thumbs up 👍👍🏽👍🏿 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 hearts ❤️🧡💛 "
    "rainbow flag 🏳️‍🌈 technologist 🧑🏻‍💻 smile 😀😃😄😁 ok 👌\n"
)
WHITESPACE = "a  b   c    d\t\te\n\n\nf \n g\r\n\r\nh      \t  \n    indented\n        deeper\n"
SPECIAL_LIKE = "<|user|> hi <|assistant|> hello [gMASK] <sop> <think> reasoning </think> <|endoftext|>\n"
TRAINING_CORPUS = [CODE, PROSE, CJK, EMOJI, WHITESPACE, SPECIAL_LIKE] * 3 + [
    " ".join(f"word{i} {i * 37 % 1000} item_{i}" for i in range(300)),
]

HELD_OUT = [
    "",
    "hello world",
    "Hello, World! It's 2024-06-01T12:34:56Z and I'VE got 1234567 tokens.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))  # 5\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i] * y[i];\n}\n",
    "    leading spaces, trailing spaces    ",
    "\t\ttabs\tand\ttabs\t\t",
    "\n\n\n",
    "line one\r\nline two\r\n\r\n",
    "          \n          ",
    "人工智能正在改变世界。我们需要新的分词器测试！",
    "龘靐齉齾 rare characters 𠀀𪚥",
    "カタカナとひらがなの混合テキスト、そして漢字。",
    "안녕하세요 세계! 토크나이저 테스트입니다.",
    "mixed 中文 and English 和 日本語 と 한국어 together 123 四五六",
    "👨‍👩‍👧‍👦👍🏽🏳️‍🌈🧑🏻‍💻🇯🇵 emoji only",
    "🙂🙃🤔🤖🦄 new emoji not in training",
    "numbers 1 12 123 1234 12345 3.14159 -42 1e-9 ٣٤٥ ⅧⅨ",
    "punctuation!!! ??? ... --- ___ *** ### @@@ $$$ %%%",
    "quotes 'single' \"double\" `back` «guillemets» „german“",
    "contractions: I'm you're he's we'll they'd it's CAN'T WON'T",
    "special-like text <|user|> and <|assistant|> and [gMASK]<sop>",
    "<|user|>\nWhat is 2+2?<|assistant|>\n<think>simple</think>4",
    "accents: café naïve résumé Ångström Ελληνικά русский текст עברית العربية",
    "zero\u200bwidth\u200djoiner\ufeffbom and combining e\u0301",
    "\x00\x01\x02 control \x7f chars",
    "a" * 300 + " " + "b" * 50,
]


def hf_glm4_tokenizer(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="module")
def trained():
    """(tokens, token types, merges) of a byte-level BPE trained with the glm4 pre-tokenizer,
    GLM special tokens appended as control tokens."""
    tok = hf_glm4_tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=2000, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [TOKEN_NORMAL] * len(tokens) + [TOKEN_CONTROL] * len(GLM_SPECIAL_TOKENS)
    return tokens + GLM_SPECIAL_TOKENS, types, merges


@pytest.fixture(scope="module")
def reference(trained):
    """HF tokenizer from the same vocabulary and merges: ignore_merges, specials as special tokens."""
    tokens, types, merges = trained
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges],
                     ignore_merges=True)
    tok = hf_glm4_tokenizer(bpe)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == TOKEN_CONTROL])
    return tok


def reference_ids(reference: Tokenizer, text: str, special: bool) -> list[int]:
    reference.encode_special_tokens = not special
    return reference.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def gguf_path(trained, tmp_path_factory):
    """A GLM4-MoE GGUF carrying the trained vocabulary (metadata only: enough for a tokenizer and
    for llama.cpp's vocab_only loading)."""
    tokens, _, _ = trained
    path = tmp_path_factory.mktemp("tok") / "trained-vocab.gguf"
    w = gguf.GGUFWriter(str(path), ARCH)
    add_glm4moe_metadata(w, ModelSpec(vocab=len(tokens)), vocab=trained)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tok(gguf_path):
    return GGUFTokenizer.from_gguf(str(gguf_path))


def test_trained_vocab_is_realistic(trained):
    tokens, _, merges = trained
    assert len(tokens) > 1500 and len(merges) > 1200
    assert any(len(t) >= 3 and not t.isascii() for t in tokens)  # multi-byte merges (CJK, emoji)


def test_fast_metadata_reader_agrees_with_gguf_py(gguf_path, tok):
    reader = gguf.GGUFReader(str(gguf_path))
    expected = {name: field.contents() for name, field in reader.fields.items()
                if name.startswith("tokenizer.ggml.")}
    assert read_tokenizer_metadata(str(gguf_path)) == expected
    via_reader = GGUFTokenizer.from_reader(reader)
    assert via_reader.tokenize(EMOJI.encode() + CJK.encode(), special=True) == \
        tok.tokenize(EMOJI.encode() + CJK.encode(), special=True)


def test_reads_gguf_metadata(tok, trained):
    tokens, _, _ = trained
    special = {t: tokens.index(t) for t in GLM_SPECIAL_TOKENS}
    assert tok.n_vocab == len(tokens)
    assert tok.bos_id == special["[gMASK]"]
    assert tok.eos_id == special["<|endoftext|>"]
    assert tok.eot_id == special["<|user|>"]
    assert tok.eom_id == special["<|observation|>"]
    assert tok.eog_ids == {special[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    assert all(tok.is_eog(i) for i in tok.eog_ids)
    assert not tok.is_eog(special["<|assistant|>"]) and not tok.is_eog(0)


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("text", HELD_OUT + TRAINING_CORPUS[:6])
def test_matches_hf_reference(tok, reference, text, special):
    assert tok.tokenize(text.encode(), add_bos=True, special=special) == reference_ids(reference, text, special)


@pytest.mark.parametrize("text", HELD_OUT)
def test_detokenize_round_trip(tok, text):
    data = text.encode()
    assert tok.detokenize(tok.tokenize(data)) == data
    assert tok.detokenize(tok.tokenize(data, special=True), special=True) == data


def test_ignore_merges_takes_whole_vocab_pieces(trained, tok):
    # A vocabulary entry that the merges could not build: llama.cpp's glm4 takes it whole.
    tokens, types, merges = trained
    extra = GGUFTokenizer(tokens + ["Ġunmergeable"], types + [TOKEN_NORMAL], merges)
    assert extra.tokenize(b" unmergeable") == [len(tokens)]
    assert len(tok.tokenize(b" unmergeable")) > 1


@pytest.mark.parametrize("data, as_text", [
    (b"\xff", "\ufffd"),
    (b"ab\x80cd", "ab\ufffdcd"),
    (b"\xe4\xb8", "\ufffd\ufffd"),              # truncated 3-byte sequence: one U+FFFD per byte
    (b"\xe4\xb8abc", "\ufffd\ufffdabc"),
    (b"\xf0\x9f\x98 x", "\ufffd\ufffd\ufffd x"),
    (b"\xc0\x80", "\x00"),                      # overlong forms decode, as in llama.cpp
    (b"\xe0\x81\x81", "A"),
    (b"\xed\xa0\x80", "\ufffd\ufffd\ufffd"),    # surrogate: not representable, one U+FFFD per byte
    (b"\xf8\x88\x80\x80\x80", "\ufffd" * 5),
    ("中文".encode() + b"\xa0" + "한".encode(), "中文\ufffd한"),
])
def test_invalid_utf8_like_llama(tok, reference, data, as_text):
    assert decode_input_like_llama(data) == as_text
    assert tok.tokenize(data) == reference_ids(reference, as_text, special=False)


def test_invalid_utf8_differs_from_python_replace():
    # Python merges a truncated sequence into one U+FFFD; llama.cpp (and we) give one per byte.
    assert b"\xe4\xb8a".decode("utf-8", errors="replace") == "\ufffda"
    assert decode_input_like_llama(b"\xe4\xb8a") == "\ufffd\ufffda"


def test_special_tokens(tok, trained):
    tokens, _, _ = trained
    user, assistant = tokens.index("<|user|>"), tokens.index("<|assistant|>")
    hello = tok.tokenize(b"hello")
    assert tok.tokenize(b"<|user|>hello", special=True) == [user] + hello
    plain = tok.tokenize(b"<|user|>hello", special=False)
    assert user not in plain and tok.detokenize(plain) == b"<|user|>hello"
    # Control tokens render only with special=True (empty otherwise, as in llama.cpp).
    ids = [user] + hello + [assistant]
    assert tok.detokenize(ids) == b"hello"
    assert tok.detokenize(ids, special=True) == b"<|user|>hello<|assistant|>"
    assert tok.token_to_piece(user) == b"" and tok.token_to_piece(user, special=True) == b"<|user|>"
    prompt = b"[gMASK]<sop><|user|>\nhi<|assistant|>\n"
    ids = tok.tokenize(prompt, special=True)
    assert ids[:3] == [tokens.index("[gMASK]"), tokens.index("<sop>"), user]
    assert tok.detokenize(ids, special=True) == prompt


def test_user_defined_tokens_always_match(trained):
    # llama.cpp matches user-defined tokens even with special=False and always renders them.
    tokens, types, merges = trained
    tokens, types = tokens + ["<tool_call>"], types + [TOKEN_USER_DEFINED]
    t = GGUFTokenizer(tokens, types, merges)
    tool = len(tokens) - 1
    for special in (False, True):
        ids = t.tokenize(b"x<tool_call>y", special=special)
        assert tool in ids and t.detokenize(ids) == b"x<tool_call>y"


def test_add_bos_follows_the_model(tok, trained):
    tokens, types, merges = trained
    assert tok.tokenize(b"hi", add_bos=True) == tok.tokenize(b"hi", add_bos=False)  # GLM: no BOS
    bos = tokens.index("[gMASK]")
    with_bos = GGUFTokenizer(tokens, types, merges, bos_id=bos, add_bos=True)
    assert with_bos.tokenize(b"hi", add_bos=True) == [bos] + tok.tokenize(b"hi")
    assert with_bos.tokenize(b"hi", add_bos=False) == tok.tokenize(b"hi")
    # llama-cpp-python drops one leading space after a leading BOS.
    assert with_bos.detokenize([bos] + tok.tokenize(b" hi")) == b"hi"


def split_character_cases(tok) -> list[str]:
    """Held-out texts where some token ends inside a multi-byte character."""
    def splits(text):
        return any(not _is_utf8(tok.token_to_piece(t)) for t in tok.tokenize(text.encode()))
    cases = [t for t in HELD_OUT + [EMOJI, CJK] if splits(t)]
    assert len(cases) >= 4
    return cases


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stream_decoder_never_emits_broken_utf8(tok):
    for text in split_character_cases(tok):
        stream = tok.stream_decoder()
        chunks = [stream.feed(t) for t in tok.tokenize(text.encode())]
        assert all("\ufffd" not in c for c in chunks)
        assert "".join(chunks) + stream.flush() == text


def test_stream_decoder_holds_back_and_flushes(tok):
    emoji = "🦄".encode()
    ids = tok.tokenize(emoji)
    assert len(ids) > 1  # unseen in training: byte-level pieces
    stream = StreamDecoder(tok)
    assert stream.feed(ids[0]) == ""  # an incomplete prefix of the emoji is held back
    assert stream.flush() == "\ufffd"
    # After flush the decoder starts afresh.
    assert "".join(stream.feed(t) for t in ids) + stream.flush() == "🦄"


def test_out_of_range_ids(tok):
    for bad in (-1, tok.n_vocab, 10**9):
        with pytest.raises(ValueError):
            tok.token_to_piece(bad)
        with pytest.raises(ValueError):
            tok.detokenize([0, bad])
        with pytest.raises(ValueError):
            tok.stream_decoder().feed(bad)


def test_rejects_other_tokenizers(trained):
    tokens, types, merges = trained
    with pytest.raises(ValueError, match="pre"):
        GGUFTokenizer(tokens, types, merges, pre="llama-bpe")
    with pytest.raises(ValueError, match="types"):
        GGUFTokenizer(tokens, types[:-1], merges)


def test_other_threads_run_while_a_long_text_is_tokenized(tok):
    """Tokenizing lets go of the GIL (a server's event loop keeps answering meanwhile): a thread
    that counts while a long text is tokenized gets to count. (HF tokenizers' encode holds the GIL
    throughout: the counter then stays near 0.)"""
    import threading
    import time

    text = ("In the beginning God created the heaven and the earth. " * 20_000).encode()
    ticks, done = [0], threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    t0 = time.monotonic()
    ids = tok.tokenize(text, add_bos=False)
    seconds = time.monotonic() - t0
    done.set()
    counter.join()
    assert len(ids) > 100_000
    # At 1 ms a tick, a free thread counts ~1000 a second; allow for a loaded machine.
    assert ticks[0] >= max(5, 50 * seconds), (ticks[0], seconds)
