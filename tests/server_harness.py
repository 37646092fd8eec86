"""Starts `llama-server` on a tiny random model in a subprocess on 127.0.0.1 for the server tests;
also reads what a process has mlock'ed (VmLck) and whether Linux lets it lock more (the mlock tests)."""
from __future__ import annotations

import os
import resource
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


def _status(pid, field: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def locked_bytes(pid="self") -> int:
    """VmLck: the bytes process pid has mlock'ed."""
    return int(_status(pid, "VmLck").split()[0]) * 1024


def may_mlock(pid: int, nbytes: int, locked_already: int = 0) -> bool:
    """Whether process pid may mlock nbytes more (whole pages) next to locked_already: it has
    CAP_IPC_LOCK (root's usually), or its RLIMIT_MEMLOCK leaves room for them, as Linux decides."""
    CAP_IPC_LOCK = 14
    if int(_status(pid, "CapEff"), 16) >> CAP_IPC_LOCK & 1:
        return True
    limit = resource.prlimit(pid, resource.RLIMIT_MEMLOCK)[0]
    page = os.sysconf("SC_PAGE_SIZE")
    pages = lambda n: -(-n // page)
    return limit == resource.RLIM_INFINITY or pages(locked_already) + pages(nbytes) <= limit // page


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

