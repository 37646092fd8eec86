"""llama-server's slot actions: POST /slots/{id_slot}?action=save|restore|erase. Save writes an idle
slot's cached tokens and their KV cells to a file in --slot-save-path, restore puts them back (a
later request with that prompt prefix then reuses them), erase empties the slot's cache. Files stay
in that directory: a filename with a path separator, "..", or another character a file system may
read otherwise is refused, as llama.cpp's fs_validate_filename refuses it."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from .. import _core
from .errors import APIError, bad_request

NO_SLOT_SAVE_PATH = ("saving, restoring and erasing slots needs --slot-save-path DIR "
                     "(this server was started without it)")
# Characters that are path syntax somewhere (Windows included), so never part of a saved slot's name.
_RESERVED = set('/\\:*?"<>|')
MAX_FILENAME_BYTES = 255  # NAME_MAX of common file systems


def valid_filename(name: str) -> bool:
    """A plain file name: 1-255 UTF-8 bytes, no control or reserved characters, surrogates, BOM or
    replacement character, no leading or trailing space, no trailing dot, no "..", not "."."""
    try:
        n_bytes = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates
        return False
    if not 0 < n_bytes <= MAX_FILENAME_BYTES or name == "." or ".." in name:
        return False
    if name[0] == " " or name[-1] in " .":
        return False
    for ch in name:
        cp = ord(ch)
        if cp < 0x20 or 0x7F <= cp <= 0x9F or ch in _RESERVED or cp in (0xFEFF, 0xFFFD) \
                or 0xD800 <= cp <= 0xDFFF:
            return False
    return True


def _write_atomically(path: str, data: bytes) -> None:
    """A reader never sees half a file: written beside it, then renamed over it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


async def _filename(request: Request) -> str:
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        raise bad_request("the body is not JSON") from None
    name = body.get("filename") if isinstance(body, dict) else None
    if not isinstance(name, str):
        raise bad_request('the body must be a JSON object with a string "filename"', "filename")
    if not valid_filename(name):
        raise bad_request(f"Invalid filename {name!r}: a plain file name inside --slot-save-path, without path "
                          "separators or \"..\"", "filename")
    return name


def register(app, state, settings) -> None:
    save_dir: Optional[str] = settings.slot_save_path

    async def engine_call(fn, *args):
        try:
            return await run_in_threadpool(fn, *args)
        except IndexError as e:
            raise bad_request(f"Invalid slot ID: {e}", "id_slot") from None
        except _core.SlotBusyError as e:
            raise APIError(409, f"{e}: wait until it is idle (GET /slots)") from None
        except _core.SlotStateUnsupportedError as e:
            raise APIError(501, str(e)) from None
        except (ValueError, _core.KVCacheFullError) as e:
            raise bad_request(f"Unable to restore slot: {e}") from None

    @app.post("/slots/{id_slot}")
    async def slot_action(id_slot: str, request: Request, action: Optional[str] = None):
        if save_dir is None:
            raise APIError(501, NO_SLOT_SAVE_PATH)
        try:
            slot = int(id_slot)
        except ValueError:
            raise bad_request(f"Invalid slot ID {id_slot!r}", "id_slot") from None
        engine = state.generator.engine
        if action == "erase":
            return {"id_slot": slot, "n_erased": await engine_call(engine.erase_slot, slot)}
        if action not in ("save", "restore"):
            raise bad_request(f"Invalid action {action!r}: save, restore or erase", "action")
        name = await _filename(request)
        path = os.path.join(save_dir, name)
        t0 = time.perf_counter()
        if action == "save":
            tokens, data = await engine_call(engine.save_slot, slot)
            try:
                await run_in_threadpool(_write_atomically, path, data)
            except OSError as e:
                raise APIError(500, f"cannot write {name!r}: {e.strerror or e}") from None
            return {"id_slot": slot, "filename": name, "n_saved": len(tokens), "n_written": len(data),
                    "timings": {"save_ms": (time.perf_counter() - t0) * 1000.0}}
        try:
            data = await run_in_threadpool(_read, path)
        except FileNotFoundError:
            raise bad_request(f"Unable to restore slot: no saved slot {name!r} in --slot-save-path",
                              "filename") from None
        except OSError as e:
            raise bad_request(f"Unable to restore slot: cannot read {name!r}: {e.strerror or e}",
                              "filename") from None
        n_restored = await engine_call(engine.restore_slot, slot, data)
        return {"id_slot": slot, "filename": name, "n_restored": n_restored, "n_read": len(data),
                "timings": {"restore_ms": (time.perf_counter() - t0) * 1000.0}}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
