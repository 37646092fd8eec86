"""Byte-level BPE tokenizer of a GLM4-MoE GGUF, on Hugging Face `tokenizers`.

Encoding is done by a `tokenizers.Tokenizer` configured to reproduce llama.cpp's `glm4`
pre-tokenizer; decoding maps each token back to raw bytes here, so that partial UTF-8 sequences
survive token boundaries. Behaviour follows llama.cpp (through llama-cpp-python's signatures):

* Invalid UTF-8 input: every byte that cannot start a sequence is one U+FFFD, as llama.cpp's
  decoder does (Python's errors="replace" would merge a truncated sequence into one U+FFFD).
  llama.cpp also accepts overlong forms (C0 80 -> U+0000); so do we. It accepts surrogates
  (ED A0 80) too, which a Rust string cannot hold: those become one U+FFFD per byte here.
* Control and unknown tokens are matched in the text only with special=True and rendered only
  with special=True (empty otherwise); user-defined tokens are always matched and rendered.
* add_bos adds BOS (and EOS) only where the GGUF's add_bos_token (add_eos_token) says so; GLM says
  no, its prompts start with [gMASK]<sop> from the chat template.
"""

from __future__ import annotations

import codecs
import mmap
import os
import stat
import struct
import threading
from typing import Any, Mapping, Optional, Sequence

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_CHATGLM4 pre-tokenizer.
GLM4_PRETOKENIZE_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Pre-tokenizer names that llama.cpp maps to that regex with ignore_merges.
SUPPORTED_PRE = ("glm4", "glm5")

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
NO_TOKEN = -1  # llama.cpp's LLAMA_TOKEN_NULL, what token_bos() etc. return when a model has none


def gpt2_byte_to_char() -> list[str]:
    """GPT-2's printable stand-in for each byte value (the alphabet of byte-level BPE tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _utf8_as_latin1(ch: str) -> str:
    return ch.encode("utf-8").decode("latin-1")


# str.translate table: alphabet char -> the byte it stands for (as a latin-1 char). Characters
# outside the alphabet below U+0100 map to their UTF-8, so `.encode("latin-1")` yields bytes.
_TO_BYTES = {ord(c): chr(b) for b, c in enumerate(gpt2_byte_to_char())}
for _cp in range(256):
    _TO_BYTES.setdefault(_cp, _utf8_as_latin1(chr(_cp)))


def _token_text_to_bytes(text: str) -> bytes:
    """Raw bytes of a byte-level token. Characters outside the byte alphabet (never in a
    well-formed vocabulary) are kept as their UTF-8."""
    mapped = text.translate(_TO_BYTES)
    try:
        return mapped.encode("latin-1")
    except UnicodeEncodeError:
        return "".join(c if ord(c) < 256 else _utf8_as_latin1(c) for c in mapped).encode("latin-1")


def _llama_utf8_error(err: UnicodeDecodeError) -> tuple[str, int]:
    """codecs error handler reproducing llama.cpp's lenient decoder at the failing position: it
    checks only lead-byte length and continuation bits, and on failure emits U+FFFD and skips
    exactly one byte."""
    data, pos = err.object, err.start
    lead = data[pos]
    if lead & 0x40:  # 0x80..0xBF fall through: a continuation byte cannot lead
        length = 2 if not lead & 0x20 else 3 if not lead & 0x10 else 4 if not lead & 0x08 else 0
        tail = data[pos + 1:pos + length]
        if length and len(tail) == length - 1 and all(b & 0xC0 == 0x80 for b in tail):
            cp = lead & (0x7F >> length)
            for b in tail:
                cp = (cp << 6) | (b & 0x3F)
            # Surrogates and code points past U+10FFFF cannot reach `tokenizers`.
            if not 0xD800 <= cp <= 0xDFFF and cp <= 0x10FFFF:
                return chr(cp), pos + length
    return "\ufffd", pos + 1


codecs.register_error("glmoe-llama-utf8", _llama_utf8_error)


def decode_input_like_llama(text: bytes) -> str:
    """`text` as the code points llama.cpp's tokenizer sees (see the module docstring)."""
    return text.decode("utf-8", errors="glmoe-llama-utf8")


# GGUF value types (gguf.GGUFValueType) of fixed size, as struct formats.
_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_tokenizer_metadata(path: str) -> dict[str, Any]:
    """The tokenizer.ggml.* keys of a little-endian GGUF. gguf.GGUFReader builds numpy views of
    every string of a 150k-token, 300k-merge vocabulary and takes seconds; this walks only the
    key-value section and decodes just the tokenizer keys."""
    current = ["(header)"]  # the key being read, for error messages
    try:
        return _read_tokenizer_metadata(path, current)
    except (struct.error, IndexError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        raise ValueError(f"{path}: cannot read metadata key {current[0]}: {type(e).__name__}: {e}") from None


def _read_tokenizer_metadata(path: str, current: list) -> dict[str, Any]:
    # O_NONBLOCK: opening a FIFO would wait for a writer; anything but a regular file is refused.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        os.close(fd)
        raise ValueError(f"{path} is not a regular file" if not stat.S_ISREG(st.st_mode)
                         else f"{path}: file is too small to be GGUF (0 bytes)")
    with os.fdopen(fd, "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse_tokenizer_metadata(path, mm, current)


def _parse_tokenizer_metadata(path: str, mm, current: list) -> dict[str, Any]:
    if mm[:4] != b"GGUF" or struct.unpack_from("<I", mm, 4)[0] not in (2, 3):
        # Not a little-endian GGUF v2/v3: leave the diagnosis (or big-endian) to gguf-py.
        return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()
                if name.startswith("tokenizer.ggml.")}
    n_kv = struct.unpack_from("<Q", mm, 16)[0]
    pos, out = 24, {}

    def string(at: int, keep: bool) -> tuple[Any, int]:
        n = struct.unpack_from("<Q", mm, at)[0]
        if at + 8 + n > len(mm):
            raise ValueError(f"{path}: metadata key {current[0]}: string of {n} bytes runs past the end of the file")
        return (mm[at + 8:at + 8 + n].decode("utf-8") if keep else None), at + 8 + n

    def value(kind: int, at: int, keep: bool) -> tuple[Any, int]:
        if kind == _GGUF_STRING:
            return string(at, keep)
        if kind in _GGUF_SCALAR:
            fmt = "<" + _GGUF_SCALAR[kind]
            return struct.unpack_from(fmt, mm, at)[0], at + struct.calcsize(fmt)
        if kind != _GGUF_ARRAY:
            raise ValueError(f"{path}: unknown GGUF value type {kind}")
        item, n = struct.unpack_from("<IQ", mm, at)
        at += 12
        if item in _GGUF_SCALAR:
            size = struct.calcsize(_GGUF_SCALAR[item])
            items = (list(struct.unpack_from(f"<{n}{_GGUF_SCALAR[item]}", mm, at)) if keep else None)
            return items, at + n * size
        items = []
        for _ in range(n):
            v, at = value(item, at, keep)
            items.append(v)
        return (items if keep else None), at

    for _ in range(n_kv):
        n = struct.unpack_from("<Q", mm, pos)[0]
        current[0] = repr(mm[pos + 8:pos + 8 + min(n, 200)].decode("utf-8", errors="replace"))
        key, pos = string(pos, True)
        current[0] = repr(key)
        kind = struct.unpack_from("<I", mm, pos)[0]
        keep = key.startswith("tokenizer.ggml.")
        v, pos = value(kind, pos + 4, keep)
        if keep:
            out[key] = v
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked_strings(values: Any, key: str) -> list:
    """values, if it is a list of strings that are valid Unicode (no lone surrogates)."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"tokenizer.ggml.{key} is a {type(values).__name__}, not an array of strings")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ValueError(f"tokenizer.ggml.{key}[{i}] is a {type(v).__name__}, not a string")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"tokenizer.ggml.{key}[{i}] is not valid UTF-8") from None
    return list(values)


class GGUFTokenizer:
    """llama-cpp-python's tokenizer interface over a GGUF vocabulary (`gpt2` model, `glm4` pre)."""

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        merges: Sequence[str],
        *,
        bos_id: int = NO_TOKEN,
        eos_id: int = NO_TOKEN,
        eot_id: int = NO_TOKEN,
        eom_id: int = NO_TOKEN,
        unk_id: int = NO_TOKEN,
        pad_id: int = NO_TOKEN,
        add_bos: bool = False,
        add_eos: bool = False,
        pre: str = "glm4",
    ):
        if pre not in SUPPORTED_PRE:
            raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r} (supported: {', '.join(SUPPORTED_PRE)})")
        if len(tokens) != len(token_types):
            raise ValueError(f"{len(tokens)} tokens but {len(token_types)} token types")
        n_vocab = len(tokens)
        ids = dict(bos=bos_id, eos=eos_id, eot=eot_id, eom=eom_id, unk=unk_id, pad=pad_id)
        for name, value in ids.items():
            # As llama.cpp: an out-of-range special id means "none".
            ids[name] = value if 0 <= value < n_vocab else NO_TOKEN
        self._ids = ids
        self._add_bos = add_bos and ids["bos"] != NO_TOKEN
        self._add_eos = add_eos and ids["eos"] != NO_TOKEN
        self._types = list(token_types)
        self._eog = {i for i in (ids["eos"], ids["eot"], ids["eom"]) if i != NO_TOKEN}

        # Raw bytes of each token as rendered with special=True; `_hidden` are the ones that
        # render empty otherwise. Unused tokens render empty always, as in llama.cpp.
        self._pieces: list[bytes] = []
        self._hidden: set[int] = set()
        for i, (text, kind) in enumerate(zip(tokens, token_types)):
            if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN):
                self._hidden.add(i)
                self._pieces.append(text.encode("utf-8"))
            elif kind == TOKEN_USER_DEFINED:
                self._pieces.append(text.encode("utf-8"))
            elif kind == TOKEN_UNUSED:
                self._pieces.append(b"")
            else:
                self._pieces.append(_token_text_to_bytes(text))

        self._longest_piece = max([1, *map(len, self._pieces)])

        # Every token stays in the BPE vocabulary, specials included: with ignore_merges a
        # pre-tokenized piece equal to any vocabulary entry is taken whole, as in llama.cpp.
        vocab = {text: i for i, text in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=True, byte_fallback=False, fuse_unk=False)
        hf = Tokenizer(bpe)
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GLM4_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        # Control and unknown tokens are "special": matched only with special=True (toggled per
        # call through encode_special_tokens). User-defined ones are matched always.
        added = [AddedToken(tokens[i], special=token_types[i] != TOKEN_USER_DEFINED, normalized=False)
                 for i in range(n_vocab) if token_types[i] in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)]
        hf.add_tokens(added)
        self._hf = hf
        # encode_special_tokens is tokenizer state; the lock keeps concurrent callers apart.
        self._hf_lock = threading.Lock()

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "GGUFTokenizer":
        """From GGUF tokenizer keys (full names) and their values."""
        def value(name: str, default=None):
            return metadata.get("tokenizer.ggml." + name, default)

        model = value("model")
        if model != "gpt2":
            raise ValueError(f"unsupported tokenizer.ggml.model {model!r} (expected 'gpt2')")
        tokens = value("tokens")
        if tokens is None:
            raise ValueError("the GGUF has no tokenizer.ggml.tokens")
        tokens = _checked_strings(tokens, "tokens")
        if not tokens:
            raise ValueError("tokenizer.ggml.tokens is empty")
        token_types = value("token_type", [TOKEN_NORMAL] * len(tokens))
        if not isinstance(token_types, (list, tuple)) or len(token_types) != len(tokens):
            n = len(token_types) if isinstance(token_types, (list, tuple)) else type(token_types).__name__
            raise ValueError(f"tokenizer.ggml.token_type has {n} entries, expected one per token ({len(tokens)})")
        for i, t in enumerate(token_types):
            if not _is_int(t) or not 0 <= t <= TOKEN_BYTE:
                raise ValueError(f"tokenizer.ggml.token_type[{i}] = {t!r} is not a token type (0..{TOKEN_BYTE})")
        # llama.cpp refuses a BPE vocabulary without merges ("cannot find tokenizer merges").
        if value("merges") is None:
            raise ValueError("the GGUF has no tokenizer.ggml.merges, which a BPE (gpt2) tokenizer needs")
        merges = _checked_strings(value("merges"), "merges")
        vocab = set(tokens)
        for i, m in enumerate(merges):
            a, sep, b = m.partition(" ")
            if not sep or not a or not b:
                raise ValueError(f"tokenizer.ggml.merges[{i}] = {m[:80]!r} is not two tokens separated by a space")
            for part in (a, b, a + b):
                if part not in vocab:
                    raise ValueError(f"tokenizer.ggml.merges[{i}] = {m[:80]!r}: {part[:80]!r} "
                                     "is not in tokenizer.ggml.tokens")
        ids = {}
        for name in ("bos", "eos", "eot", "eom", "unknown", "padding"):
            v = value(name + "_token_id", NO_TOKEN)
            if not _is_int(v):
                raise ValueError(f"tokenizer.ggml.{name}_token_id = {v!r} is not an integer")
            ids[name] = int(v)
        for name in ("pre",):
            if not isinstance(value(name, "glm4"), str):
                raise ValueError(f"tokenizer.ggml.{name} = {value(name)!r} is not a string")
        # add_bos_token, add_eos_token, add_sep_token, add_space_prefix...: llama.cpp reads them as
        # bools and refuses any other type (an int or a string would be taken as true here).
        for key, v in metadata.items():
            if key.startswith("tokenizer.ggml.add_") and not isinstance(v, bool):
                raise ValueError(f"{key} = {v!r:.80} is not a bool")
        try:
            return cls(
                tokens, token_types, merges,
                bos_id=ids["bos"], eos_id=ids["eos"], eot_id=ids["eot"], eom_id=ids["eom"],
                unk_id=ids["unknown"], pad_id=ids["padding"],
                add_bos=value("add_bos_token", False),
                add_eos=value("add_eos_token", False),
                pre=value("pre", "glm4"),
            )
        except ValueError:
            raise
        except BaseException as e:  # noqa: BLE001 - a pyo3 PanicException derives from BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            raise ValueError("the tokenizer of tokenizer.ggml.tokens / merges / token_type cannot be built: "
                             f"{type(e).__name__}: {str(e)[:300]}") from None

    @classmethod
    def from_reader(cls, reader: gguf.GGUFReader) -> "GGUFTokenizer":
        return cls.from_metadata({name: field.contents() for name, field in reader.fields.items()
                                  if name.startswith("tokenizer.ggml.")})

    @classmethod
    def from_gguf(cls, path: str) -> "GGUFTokenizer":
        return cls.from_metadata(read_tokenizer_metadata(path))

    # -- ids ------------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return len(self._pieces)

    @property
    def longest_piece(self) -> int:
        """Bytes of the longest token (control tokens' text included), at least 1: no text of more
        than n * longest_piece bytes is n tokens or fewer."""
        return self._longest_piece

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def eot_id(self) -> int:
        return self._ids["eot"]

    @property
    def eom_id(self) -> int:
        return self._ids["eom"]

    @property
    def unk_id(self) -> int:
        return self._ids["unk"]

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def eog_ids(self) -> frozenset[int]:
        """End-of-generation ids: eos, eot and eom."""
        return frozenset(self._eog)

    def is_eog(self, token: int) -> bool:
        """End of generation: eos, eot or eom."""
        return token in self._eog

    def token_type(self, token: int) -> int:
        self._check(token)
        return self._types[token]

    # -- text <-> ids ---------------------------------------------------------------------------

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of UTF-8 `text` (invalid bytes become U+FFFD as in llama.cpp). `special`
        parses control tokens written in the text; `add_bos` adds BOS/EOS only where the model
        asks for them (add_bos_token / add_eos_token)."""
        decoded = decode_input_like_llama(bytes(text))
        with self._hf_lock:
            self._hf.encode_special_tokens = not special
            # encode_batch lets other threads run meanwhile (encode holds the GIL throughout), so
            # a long text does not stall a server's event loop.
            ids = self._hf.encode_batch([decoded], add_special_tokens=False)[0].ids
        if add_bos and self._add_bos:
            ids.insert(0, self._ids["bos"])
        if add_bos and self._add_eos:
            ids.append(self._ids["eos"])
        return ids

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        """Raw bytes of one token (possibly part of a UTF-8 sequence); control tokens are empty
        unless `special`."""
        self._check(token)
        if not special and token in self._hidden:
            return b""
        return self._pieces[token]

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        """Concatenated raw bytes of `tokens`. Pieces are context-free, so `prev_tokens` (kept for
        llama-cpp-python's signature) changes nothing."""
        out = b"".join(self.token_to_piece(t, special) for t in tokens)
        # llama-cpp-python drops one leading space after a leading BOS (a Llama-1 convention).
        if tokens and tokens[0] == self._ids["bos"] and out[:1] == b" ":
            out = out[1:]
        return out

    def stream_decoder(self, special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, special)

    def _check(self, token: int) -> None:
        if not 0 <= token < len(self._pieces):
            raise ValueError(f"token id {token} out of range [0, {len(self._pieces)})")


class StreamDecoder:
    """Incremental detokenizer: feed() returns only complete UTF-8 characters and holds back an
    incomplete trailing sequence, so a character split across tokens is never emitted broken.
    flush() returns what is held back, with U+FFFD for bytes that never completed."""

    def __init__(self, tokenizer: GGUFTokenizer, special: bool = False):
        self._tokenizer = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(self._tokenizer.token_to_piece(token, self._special))

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
