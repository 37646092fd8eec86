"""What the server is started with: the parsed command line, as the app factory takes it."""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional


@dataclasses.dataclass
class Settings:
    model_path: str
    n_ctx: int = 4096  # the whole KV cache, shared by n_parallel slots of n_ctx // n_parallel
    n_parallel: int = 4
    n_threads: int = 0  # 0: the engine's choice
    n_batch: int = 512
    n_gpu_layers: int = 0  # as llama.cpp's -ngl
    # llama.cpp's -ot values ("PATTERN=BUFFER[,PATTERN=BUFFER...]", one per flag), --cpu-moe, --n-cpu-moe.
    tensor_overrides: List[str] = dataclasses.field(default_factory=list)
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    alias: Optional[str] = None
    api_key: Optional[str] = None
    chat_template: Optional[str] = None  # jinja source; None: the model's tokenizer.chat_template
    # Suffix decoding (speculative drafts from text already seen), verified inside the batch.
    spec_suffix: bool = False
    spec_max_depth: int = 64
    spec_max_spec_factor: float = 1.0
    spec_min_token_prob: float = 0.1
    # Called in the loading thread before the model loads (tests hold the server in "loading").
    before_load: Optional[Callable[[], None]] = None

    @property
    def model_name(self) -> str:
        return self.alias or self.model_path
