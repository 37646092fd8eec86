"""Starts `llama-server` on a tiny random model in a subprocess on 127.0.0.1 for the server tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

N_CTX, N_PARALLEL = 4096, 4
API_KEY = "test-key"


def make_tiny_model(directory) -> str:
    from glmoe.tools.make_model import PRESETS, ModelSpec, write_model

    path = os.path.join(str(directory), "tiny.gguf")
    write_model(path, ModelSpec(**PRESETS["tiny"]), seed=0)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_path: str, *extra: str, scheme: str = "http"):
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        args = ["-m", model_path, "--host", "127.0.0.1", "--port", str(self.port), "-c", str(N_CTX),
                "-np", str(N_PARALLEL), "-t", "1", "--api-key", API_KEY, "-a", "tiny", *extra]
        self.proc = subprocess.Popen([sys.executable, "-m", "glmoe.server", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0, verify=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become healthy")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {API_KEY}"}

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

