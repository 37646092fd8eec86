"""For the mlock tests: what a process has mlock'ed (VmLck) and whether Linux lets it lock more."""
from __future__ import annotations

import os
import resource


def _status(pid, field: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def has_cap_ipc_lock(pid="self") -> bool:
    """Whether process pid may lock memory past RLIMIT_MEMLOCK (CAP_IPC_LOCK, root's usually)."""
    CAP_IPC_LOCK = 14
    return bool(int(_status(pid, "CapEff"), 16) >> CAP_IPC_LOCK & 1)


def locked_bytes(pid="self") -> int:
    """VmLck: the bytes process pid has mlock'ed."""
    return int(_status(pid, "VmLck").split()[0]) * 1024


def may_mlock(pid: int, nbytes: int, locked_already: int = 0) -> bool:
    """Whether process pid may mlock nbytes more (whole pages) next to locked_already: it has
    CAP_IPC_LOCK (root's usually), or its RLIMIT_MEMLOCK leaves room for them, as Linux decides."""
    if has_cap_ipc_lock(pid):
        return True
    limit = resource.prlimit(pid, resource.RLIMIT_MEMLOCK)[0]
    page = os.sysconf("SC_PAGE_SIZE")
    pages = lambda n: -(-n // page)
    return limit == resource.RLIM_INFINITY or pages(locked_already) + pages(nbytes) <= limit // page
