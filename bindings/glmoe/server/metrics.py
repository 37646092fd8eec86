"""/metrics in Prometheus' text format, written by hand (a handful of series needs no library).
The llama.cpp series keep llama.cpp's names so its dashboards work unchanged."""
from __future__ import annotations

import collections
import threading
from typing import Dict, Optional, Tuple


class HTTPCounters:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Dict[Tuple[str, int], int] = collections.Counter()

    def count(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1


def _line(out, name: str, kind: str, help_text: str, value, labels: str = "") -> None:
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n{name}{labels} {value}\n")


def render(http: HTTPCounters, stats: Optional[dict], waiting_in_server: int) -> str:
    out = []
    out.append("# HELP glmoe:http_requests_total HTTP requests answered, by route and status.\n"
               "# TYPE glmoe:http_requests_total counter\n")
    with http._lock:
        for (route, status), n in sorted(http.requests.items()):
            out.append(f'glmoe:http_requests_total{{route="{route}",status="{status}"}} {n}\n')
    if stats is None:  # still loading
        return "".join(out)
    busy_s = stats["t_busy_ms_total"] / 1000.0
    _line(out, "llamacpp:prompt_tokens_total", "counter", "Prompt tokens processed.", stats["prompt_tokens_total"])
    _line(out, "llamacpp:tokens_predicted_total", "counter", "Tokens generated.", stats["generated_tokens_total"])
    _line(out, "llamacpp:n_decode_total", "counter", "Engine decode steps.", stats["decode_steps_total"])
    _line(out, "llamacpp:predicted_tokens_seconds", "gauge", "Generated tokens per second of engine busy time.",
          f"{stats['generated_tokens_total'] / busy_s if busy_s > 0 else 0.0:.3f}")
    # Not llama.cpp series (its server exports none for drafts): glmoe's own names.
    _line(out, "glmoe:draft_tokens_total", "counter", "Speculative draft tokens verified.",
          stats["draft_tokens_total"])
    _line(out, "glmoe:draft_tokens_accepted_total", "counter", "Speculative draft tokens accepted.",
          stats["draft_accepted_total"])
    _line(out, "llamacpp:requests_processing", "gauge", "Requests in a slot.", stats["requests_running"])
    _line(out, "llamacpp:requests_deferred", "gauge", "Requests queued (in the engine and in front of it).",
          stats["requests_waiting"] + waiting_in_server)
    _line(out, "llamacpp:kv_cache_tokens", "gauge", "KV cache cells in use.", stats["kv_cells_used"])
    _line(out, "llamacpp:kv_cache_usage_ratio", "gauge", "KV cache use (0..1).",
          f"{stats['kv_cells_used'] / max(stats['kv_cells_total'], 1):.6f}")
    return "".join(out)
