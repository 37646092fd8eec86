"""llama-server's slot actions (POST /slots/{id}?action=save|restore|erase with --slot-save-path) and
the engine's slot state under them: a restored slot continues as the saved one did, files stay in
the save directory, and state from another model, slot context or KV type is refused."""
from __future__ import annotations

import os
import threading

import httpx
import numpy as np
import pytest

import server_harness as harness
from glmoe import _core
from glmoe.server.cli import parser, settings_from_args
from glmoe.server.cli_env import env_arguments
from glmoe.server.slots import valid_filename
from glmoe.tools.make_model import PRESETS, ModelSpec, write_model

PROMPT = "In the beginning God created the heaven and the earth. And the earth was"


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("slots"))


@pytest.fixture(scope="module")
def slot_server(model_path, save_dir):
    # Slots of 8192 tokens: room for a request long enough to find its slot busy.
    srv = harness.ServerProcess(model_path, "--slot-save-path", save_dir, "-c", "32768")
    yield srv
    srv.stop()


def post(srv, path, body=None, status=200):
    r = httpx.post(srv.url + path, headers=srv.headers(), json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def slots(srv):
    return httpx.get(srv.url + "/slots", headers=srv.headers(), timeout=10).json()


def erase_all(srv):
    for s in slots(srv):
        post(srv, f"/slots/{s['id']}?action=erase")
    assert all(s["n_past"] == 0 for s in slots(srv))


def complete(srv):
    return post(srv, "/completion", {"prompt": PROMPT, "n_predict": 12, "temperature": 0})


def test_save_erase_restore_continues_the_same(slot_server, save_dir):
    erase_all(slot_server)
    n_prompt = len(post(slot_server, "/tokenize", {"content": PROMPT})["tokens"])
    first = complete(slot_server)
    assert first["timings"]["cache_n"] == 0 and first["timings"]["prompt_n"] == n_prompt
    (used,) = [s for s in slots(slot_server) if s["n_past"] > 0]  # all empty before: the lowest id took it
    assert used["id"] == 0 and used["n_past"] >= n_prompt

    saved = post(slot_server, "/slots/0?action=save", {"filename": "bible.bin"})
    assert saved["id_slot"] == 0 and saved["filename"] == "bible.bin" and saved["n_saved"] == used["n_past"]
    assert saved["n_written"] == os.path.getsize(os.path.join(save_dir, "bible.bin")) > 0
    assert saved["timings"]["save_ms"] >= 0
    assert post(slot_server, "/slots/0?action=erase") == {"id_slot": 0, "n_erased": used["n_past"]}
    assert slots(slot_server)[0]["n_past"] == 0
    assert post(slot_server, "/slots/0?action=erase")["n_erased"] == 0

    restored = post(slot_server, "/slots/0?action=restore", {"filename": "bible.bin"})
    assert restored["id_slot"] == 0 and restored["n_restored"] == used["n_past"]
    assert restored["n_read"] == saved["n_written"] and restored["timings"]["restore_ms"] >= 0
    assert slots(slot_server)[0]["n_past"] == used["n_past"]
    again = complete(slot_server)
    assert again["content"] == first["content"]  # greedy: the restored cache gives the same continuation
    # The prompt came from the restored cells; only its last token ran again (for its logits).
    assert again["timings"]["cache_n"] == n_prompt - 1 and again["timings"]["prompt_n"] == 1
    assert again["tokens_cached"] == n_prompt - 1


def test_restore_into_another_slot(slot_server):
    erase_all(slot_server)
    first = complete(slot_server)
    post(slot_server, "/slots/0?action=save", {"filename": "moved.bin"})
    erase_all(slot_server)
    n = post(slot_server, "/slots/2?action=restore", {"filename": "moved.bin"})["n_restored"]
    assert [s["n_past"] for s in slots(slot_server)] == [0, 0, n, 0]
    again = complete(slot_server)  # goes to slot 2, which shares the prompt
    assert again["content"] == first["content"] and again["timings"]["cache_n"] > 0
    assert slots(slot_server)[2]["n_past"] >= n and slots(slot_server)[0]["n_past"] == 0


@pytest.mark.parametrize("name", ["../escape.bin", "a/b.bin", "/tmp/abs.bin", "..", ".", "", "a\\b", "a\x00b",
                                  " lead", "trail.", "c:d", "x" * 256])
def test_bad_filenames_are_refused(slot_server, save_dir, name):
    for action in ("save", "restore"):
        err = post(slot_server, f"/slots/0?action={action}", {"filename": name}, 400)
        assert "Invalid filename" in err["error"]["message"]
    assert not os.path.exists(os.path.join(os.path.dirname(save_dir), "escape.bin"))
    assert not os.path.exists("/tmp/abs.bin")


def test_valid_filename_rules():
    assert valid_filename("slot-0.bin") and valid_filename("é" * 127) and valid_filename(".hidden")
    assert not valid_filename("é" * 128)  # 256 UTF-8 bytes
    assert not valid_filename("a\ud800") and not valid_filename("a\ufeff") and not valid_filename("a\x7f")


def test_bad_requests(slot_server):
    assert "no saved slot" in post(slot_server, "/slots/0?action=restore", {"filename": "nope.bin"}, 400)[
        "error"]["message"]
    assert "Invalid action" in post(slot_server, "/slots/0?action=load", {"filename": "a"}, 400)["error"]["message"]
    assert "Invalid action" in post(slot_server, "/slots/0", {"filename": "a"}, 400)["error"]["message"]
    assert "Invalid slot ID" in post(slot_server, "/slots/9?action=erase", None, 400)["error"]["message"]
    assert "Invalid slot ID" in post(slot_server, "/slots/x?action=erase", None, 400)["error"]["message"]
    assert "filename" in post(slot_server, "/slots/0?action=save", {"name": "a"}, 400)["error"]["message"]
    assert "filename" in post(slot_server, "/slots/0?action=save", [1], 400)["error"]["message"]


def test_busy_slot_is_refused(slot_server):
    started = threading.Event()

    def long_stream():
        body = {"prompt": PROMPT, "n_predict": 8000, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", slot_server.url + "/completion", headers=slot_server.headers(), json=body,
                          timeout=60) as r:
            for _ in r.iter_lines():
                started.set()
                if done.is_set():
                    return

    done = threading.Event()
    post(slot_server, "/slots/3?action=save", {"filename": "busy.bin"})  # a file restore could read
    t = threading.Thread(target=long_stream)
    t.start()
    try:
        assert started.wait(30)
        (busy,) = [s for s in slots(slot_server) if s["state"] != "idle"]
        for action in ("save", "restore", "erase"):
            err = post(slot_server, f"/slots/{busy['id']}?action={action}", {"filename": "busy.bin"}, 409)
            assert "processing a request" in err["error"]["message"]
    finally:
        done.set()
        t.join(30)


def test_without_slot_save_path_actions_are_refused(server):
    for action in ("save", "restore", "erase"):
        err = post(server, f"/slots/0?action={action}", {"filename": "a.bin"}, 501)
        assert "--slot-save-path" in err["error"]["message"]


def test_state_of_another_kv_type_is_refused_by_the_server(model_path, slot_server, save_dir):
    post(slot_server, "/slots/0?action=save", {"filename": "f32.bin"})
    q8 = harness.ServerProcess(model_path, "--slot-save-path", save_dir, "-c", "32768", "-ctk", "q8_0")
    try:
        err = post(q8, "/slots/0?action=restore", {"filename": "f32.bin"}, 400)
        assert "KV types" in err["error"]["message"] and "q8_0" in err["error"]["message"]
    finally:
        q8.stop()


def test_slot_save_path_from_the_environment(tmp_path):
    ap = parser()
    env = {"LLAMA_ARG_SLOT_SAVE_PATH": str(tmp_path / "env-slots")}
    args = ap.parse_args(env_arguments(ap, [], env))
    assert settings_from_args(args).slot_save_path == env["LLAMA_ARG_SLOT_SAVE_PATH"]
    argv = ["--slot-save-path", "/cli"]  # the command line wins
    assert ap.parse_args(env_arguments(ap, argv, env) + argv).slot_save_path == "/cli"
    assert settings_from_args(parser().parse_args([])).slot_save_path is None


# ---- the engine's slot state ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(model_path):
    return _core.Model(model_path)


def engine(model, n_ctx=256, n_parallel=2, **kw):
    return _core.BatchEngine(model, n_ctx, n_parallel=n_parallel, n_threads=1, keep_slot_cache=True, **kw)


def run(e, prompt, n):
    rid = e.submit(prompt, n, [], temperature=0)
    tokens = []
    while True:
        ev = e.poll(rid, 10.0)
        tokens += ev["tokens"]
        if ev["finished"]:
            return tokens, ev


PROMPT_IDS = [5, 17, 3, 99, 42, 8, 61, 7, 23, 11]


def test_engine_state_refused_across_models_contexts_and_kv_types(tiny, tmp_path):
    e = engine(tiny)
    run(e, PROMPT_IDS, 6)
    tokens, state = e.save_slot(0)
    assert tokens[:len(PROMPT_IDS)] == PROMPT_IDS and len(tokens) == len(PROMPT_IDS) + 5
    other_path = str(tmp_path / "other.gguf")
    write_model(other_path, ModelSpec(**PRESETS["tiny"]), seed=1)  # same shape, other weights
    other = engine(_core.Model(other_path))
    q8 = engine(tiny, type_k=8)
    wider = engine(tiny, n_ctx=512)
    try:
        with pytest.raises(ValueError, match="another model"):
            other.restore_slot(0, state)
        with pytest.raises(ValueError, match="KV types"):
            q8.restore_slot(0, state)
        with pytest.raises(ValueError, match="slot context of 128"):
            wider.restore_slot(0, state)
        with pytest.raises(ValueError, match="not a glmoe slot file"):
            e.restore_slot(1, b"nonsense" * 8)
        with pytest.raises(ValueError, match="wrong size|truncated"):
            e.restore_slot(1, state[:-1])
        with pytest.raises(IndexError):
            e.save_slot(2)
        assert e.slots()[1]["n_past"] == 0  # refused restores left the slot as it was
        assert e.restore_slot(1, state) == len(tokens) and e.stats()["kv_cells_used"] == 2 * len(tokens)
    finally:
        for x in (e, other, q8, wider):
            x.shutdown()


def test_engine_busy_slot_and_reuse(tiny):
    e = engine(tiny)
    try:
        want, _ = run(e, PROMPT_IDS, 8)
        _, state = e.save_slot(0)
        assert e.erase_slot(0) == len(PROMPT_IDS) + 7 and e.stats()["kv_cells_used"] == 0
        e.restore_slot(1, state)
        got, ev = run(e, PROMPT_IDS, 8)
        assert got == want and ev["n_cached"] == len(PROMPT_IDS) - 1
        # Constrained: after its first token it waits for the next mask, so it holds its slot
        # however fast the model runs.
        allow_all = np.full(e.mask_words, 0xFFFFFFFF, dtype=np.uint32)
        rid = e.submit(PROMPT_IDS, 0, [], temperature=0, token_mask=allow_all)
        e.poll(rid, 10.0)
        (busy,) = [s["id"] for s in e.slots() if s["request_id"] == rid]
        for action in (lambda: e.save_slot(busy), lambda: e.erase_slot(busy), lambda: e.restore_slot(busy, state)):
            with pytest.raises(_core.SlotBusyError):
                action()
        e.cancel(rid)
        assert e.save_slot(busy)[0][:len(PROMPT_IDS)] == PROMPT_IDS  # a cancelled request's cache stays too
    finally:
        e.shutdown()
