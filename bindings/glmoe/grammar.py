"""Constrained decoding on llguidance.

`LlamaGrammar` has llama-cpp-python's constructors (from_string for llama.cpp's GBNF, or llguidance's
Lark; from_json_schema; from_file) and checks the grammar when it is built. `TokenConstraint` is one
generation's grammar state: the mask of the tokens allowed next, advanced by each token taken.
`grammar_for_response_format` reads OpenAI's response_format as llama.cpp's server does."""
from __future__ import annotations

import json
import sys
import threading
import weakref
from typing import Any, List, Optional, Union

import llguidance
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark

from .tokenizer import TOKEN_CONTROL, TOKEN_UNKNOWN, GGUFTokenizer

# JSON Schema output may put at most one space, or one or two newlines and up to 20 indents,
# between tokens, as llama.cpp's json_schema_to_grammar allows: llguidance's default (any amount)
# lets a model drift into whitespace until max_tokens. A schema's own "x-guidance" options win.
JSON_SCHEMA_DEFAULTS = {"whitespace_pattern": r"[ ]?|\n{1,2}[ \t]{0,20}"}
# llguidance marks special tokens by this leading byte: no grammar text can produce them.
_SPECIAL_PREFIX = b"\xff"


class GrammarError(ValueError):
    """A grammar or JSON Schema that cannot be used; the message is llguidance's (or its GBNF
    converter's)."""


class LlamaGrammar:
    """A grammar for `grammar=`, built as llama-cpp-python's LlamaGrammar is; a bad grammar raises
    GrammarError (a ValueError) at once. `_grammar` keeps the source text, `kind` says what it is."""

    def __init__(self, *, _grammar: str, _llguidance: str, kind: str):
        self._grammar = _grammar
        self.kind = kind  # "gbnf" (GBNF or Lark) or "json_schema"
        self.llguidance_grammar = _llguidance

    def __repr__(self) -> str:
        return f"LlamaGrammar(kind={self.kind!r}, {len(self._grammar)} characters)"

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> "LlamaGrammar":
        """llama.cpp's GBNF (rules `name ::= ...`, starting at `root`), or an llguidance Lark grammar."""
        if not isinstance(grammar, str):
            raise TypeError(f"grammar must be a string, got {type(grammar).__name__}")
        try:
            lark = any_to_lark(grammar)
        except Exception as e:  # noqa: BLE001 - the converter raises plain Exceptions for syntax errors
            raise GrammarError(f"cannot convert the GBNF grammar: {e}") from None
        return cls._checked(grammar, llguidance.LLMatcher.grammar_from_lark(lark), "gbnf", verbose)

    @classmethod
    def from_json_schema(cls, json_schema: Union[str, dict, bool], verbose: bool = True) -> "LlamaGrammar":
        """A JSON Schema, as JSON text (llama-cpp-python's form) or as a dict / bool."""
        schema = json_schema
        if isinstance(json_schema, str):
            try:
                schema = json.loads(json_schema)
            except ValueError as e:
                raise GrammarError(f"json_schema is not JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON Schema is an object or a boolean, got {type(schema).__name__}")
        text = json.dumps(schema, ensure_ascii=False)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_SCHEMA_DEFAULTS)
        return cls._checked(text, grammar, "json_schema", verbose)

    @classmethod
    def from_file(cls, file, verbose: bool = True) -> "LlamaGrammar":
        """A GBNF (or Lark) grammar read from a UTF-8 file."""
        with open(file, encoding="utf-8") as f:
            return cls.from_string(f.read(), verbose=verbose)

    @classmethod
    def _checked(cls, source: str, grammar: str, kind: str, verbose: bool) -> "LlamaGrammar":
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise GrammarError(messages[0] if messages else "invalid grammar")
        if verbose:
            for message in messages:
                print(f"glmoe: grammar warning: {message}", file=sys.stderr)
        return cls(_grammar=source, _llguidance=grammar, kind=kind)


def as_grammar(grammar: Any) -> LlamaGrammar:
    """glmoe's LlamaGrammar, or llama-cpp-python's (whose `_grammar` is GBNF text) converted."""
    if isinstance(grammar, LlamaGrammar):
        return grammar
    source = getattr(grammar, "_grammar", None)
    if isinstance(source, str):
        return LlamaGrammar.from_string(source, verbose=False)
    raise TypeError(f"grammar must be a LlamaGrammar, got {type(grammar).__name__}")


def grammar_for_response_format(response_format: Any) -> Optional[LlamaGrammar]:
    """OpenAI's response_format: {"type": "text"} is no constraint; {"type": "json_object"} is any
    JSON object (or llama.cpp's "schema" beside it); {"type": "json_schema", "json_schema":
    {"schema": ...}} that schema (or llama.cpp's flat {"type": "json_schema", "schema": ...}). An empty
    schema means any object, as in llama.cpp."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
    elif kind == "json_schema":
        wrapper = response_format.get("json_schema")
        if wrapper is None and "schema" in response_format:  # the flat form llama.cpp's README shows
            schema = response_format["schema"]
        elif isinstance(wrapper, dict):
            schema = wrapper.get("schema")
        else:
            raise GrammarError("response_format of type json_schema needs a json_schema object holding the schema")
    else:
        raise GrammarError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    if schema is None or schema == {}:
        schema = {"type": "object"}
    return LlamaGrammar.from_json_schema(schema, verbose=False)


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads from a tokenizer: each token's bytes exactly as glmoe
    renders them (control tokens behind llguidance's special marker), the end tokens, and encode."""

    def __init__(self, tokenizer: GGUFTokenizer):
        eog = sorted(tokenizer.eog_ids)
        if not eog:
            raise ValueError("constrained decoding needs an end-of-generation token; the model has none")
        specials = [t for t in range(tokenizer.n_vocab) if tokenizer.token_type(t) in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
        special_set = set(specials)
        self.tokens: List[bytes] = [
            (_SPECIAL_PREFIX if t in special_set else b"") + tokenizer.token_to_piece(t, special=True)
            for t in range(tokenizer.n_vocab)]
        self.special_token_ids = specials
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id in eog else eog[0]
        self.bos_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
        self.eog_ids = eog
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> List[int]:
        return self._tokenizer.tokenize(text, add_bos=False, special=False)


_llg_tokenizers: "weakref.WeakKeyDictionary[GGUFTokenizer, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()
_llg_tokenizers_lock = threading.Lock()


def llguidance_tokenizer(tokenizer: GGUFTokenizer) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of a model's vocabulary, built once per GGUFTokenizer (it indexes
    every token: about a second for a 150k vocabulary)."""
    with _llg_tokenizers_lock:
        built = _llg_tokenizers.get(tokenizer)
        if built is None:
            vocab = _Vocabulary(tokenizer)
            built = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), eos_token=vocab.eog_ids)
            _llg_tokenizers[tokenizer] = built
        return built


class TokenConstraint:
    """One generation under a grammar: next_mask() gives the tokens allowed next, accept() takes
    the token chosen. For one thread at a time."""

    def __init__(self, grammar: LlamaGrammar, tokenizer: GGUFTokenizer):
        self.n_vocab = tokenizer.n_vocab
        self._matcher = llguidance.LLMatcher(llguidance_tokenizer(tokenizer), grammar.llguidance_grammar,
                                             log_level=0)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())
        self._mask = np.zeros((self.n_vocab + 31) // 32, dtype=np.uint32)
        self._mask_for = -1  # n_accepted when _mask was computed
        self.n_accepted = 0

    def next_mask(self) -> np.ndarray:
        """The tokens allowed next: bit t % 32 of word t // 32 (uint32), computed once per token.
        The array is reused for the next token's mask."""
        if self._mask_for != self.n_accepted:
            self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
            if self._matcher.is_error():
                raise GrammarError(self._matcher.get_error())
            self._mask_for = self.n_accepted
        return self._mask

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """A copy of one row of logits with the tokens the grammar forbids next at -inf."""
        allowed = np.unpackbits(self.next_mask().view(np.uint8), bitorder="little")[: self.n_vocab]
        return np.where(allowed.astype(bool), logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise GrammarError(f"the grammar cannot take token {int(token)}: {self._matcher.get_error()}")
        self.n_accepted += 1

    def is_accepting(self) -> bool:
        """Whether the text so far is a complete sentence of the grammar."""
        return self._matcher.is_accepting()
