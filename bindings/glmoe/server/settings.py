"""What the server is started with: the parsed command line, as the app factory takes it."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

if TYPE_CHECKING:
    from ..grammar import LlamaGrammar


@dataclasses.dataclass
class Settings:
    model_path: str
    n_ctx: int = 4096  # the whole KV cache, shared by n_parallel slots of n_ctx // n_parallel
    n_parallel: int = 4
    n_threads: int = 0  # 0: the engine's choice
    n_batch: int = 512
    n_gpu_layers: int = 0  # as llama.cpp's -ngl
    use_mmap: bool = True  # False: llama.cpp's --no-mmap (the file read into memory, not mapped)
    use_mlock: bool = False  # llama.cpp's --mlock: the file's bytes, mapped or read, locked in RAM
    # llama.cpp's -ot values ("PATTERN=BUFFER[,PATTERN=BUFFER...]", one per flag), --cpu-moe, --n-cpu-moe.
    tensor_overrides: List[str] = dataclasses.field(default_factory=list)
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    # llama.cpp's -ctk/-ctv as GGML type ids; -1: f32 on the CPU, f16 on the GPU.
    type_k: int = -1
    type_v: int = -1
    # llama.cpp's --slot-save-path: the directory of saved slots (None: slot actions are refused);
    # with it, idle slots keep their cache for the next request that shares its prompt prefix.
    slot_save_path: Optional[str] = None
    alias: Optional[str] = None
    api_key: Optional[str] = None
    api_keys: List[str] = dataclasses.field(default_factory=list)  # more keys (--api-key-file), any one works
    chat_template: Optional[str] = None  # jinja source; None: the model's tokenizer.chat_template
    # Suffix decoding (speculative drafts from text already seen), verified inside the batch.
    spec_suffix: bool = False
    spec_max_depth: int = 64
    spec_max_spec_factor: float = 1.0
    spec_min_token_prob: float = 0.1
    # llama.cpp's -n: the max_tokens of a request that gives none, and a cap on those that do (-1: none).
    n_predict: int = -1
    # Sampling defaults from the command line (--temp, --seed ...), under the request fields' names;
    # they apply to the fields a request leaves unset.
    sampling_defaults: Dict[str, Any] = dataclasses.field(default_factory=dict)
    reasoning_format: str = "auto"  # "none": GLM's <think> stays in content; "deepseek" / "auto": reasoning_content
    chat_template_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)  # requests' own keys win
    # llama.cpp's --reasoning-budget N > 0: a chat answer thinks at most N tokens (thinking_budget.py);
    # -1: unrestricted (0 is enable_thinking=false in chat_template_kwargs).
    reasoning_budget: int = -1
    # llama.cpp's --grammar / --grammar-file / -j / -jf: the constraint of requests that set none.
    default_grammar: Optional["LlamaGrammar"] = None
    # llama.cpp's --embedding: serve /embedding, /embeddings and /v1/embeddings (from a second context,
    # made on first use); pooling as its --pooling (None: the model's, which is "none" for GLM's files).
    embedding: bool = False
    pooling: Optional[str] = None
    # Called in the loading thread before the model loads (tests hold the server in "loading").
    before_load: Optional[Callable[[], None]] = None
    # Called with the message when the model fails to load (llama-server exits; None: serve the error).
    on_load_failure: Optional[Callable[[str], None]] = None

    @property
    def all_api_keys(self) -> List[str]:
        return ([self.api_key] if self.api_key else []) + list(self.api_keys)

    @property
    def model_name(self) -> str:
        return self.alias or self.model_path
