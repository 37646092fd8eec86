"""llama-server's connections (issue 19): read, write and idle timeouts under --timeout, a cap on
open connections answered with OpenAI's 503 body, a short log when file descriptors run out, and
big JSON bodies and answers handled off the event loop."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from pydantic import BaseModel

import server_harness as harness

TIMEOUT_S = 2  # the servers' --timeout; their idle keep-alive timeout is min(5 s, --timeout)


@pytest.fixture(scope="module")
def server(model_path):
    srv = harness.ServerProcess(model_path, "--timeout", str(TIMEOUT_S))
    yield srv
    srv.stop()


def _auth_head(method, path, extra=""):
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {harness.API_KEY}\r\n"
            f"Content-Type: application/json\r\n{extra}").encode()


def _seconds_until_closed(sock, limit=15.0) -> float:
    """Reads and drops whatever comes until the server closes the connection; the time it took."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def _health_ok(server) -> float:
    t0 = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    return time.monotonic() - t0


def test_silent_connection_is_closed(server):
    """Before: a connection that never sent a byte stayed open for ever (uvicorn's idle timer
    starts only after a first response)."""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        waited = _seconds_until_closed(s)
    assert TIMEOUT_S - 0.5 < waited < TIMEOUT_S + 2


def test_slowloris_head_is_dropped(server):
    """Before: a request head sent one byte every 0.25 s held its connection for as long as it
    kept coming (no read timeout; each byte restarted nothing). Now: dropped --timeout after its
    first byte, /health answering meanwhile."""
    head = _auth_head("GET", "/health", "X-Slow: " + "y" * 200 + "\r\n")
    s = socket.create_connection(("127.0.0.1", server.port))
    t0 = time.monotonic()
    sent = 0
    try:
        while sent < len(head) and time.monotonic() - t0 < 10:
            s.send(head[sent:sent + 1])
            sent += 1
            time.sleep(0.25)
            if sent % 4 == 0:
                assert _health_ok(server) < 1.0
    except OSError:  # the server closed it: the next send fails
        pass
    dropped_after = time.monotonic() - t0
    s.close()
    assert sent < len(head) and TIMEOUT_S - 0.5 < dropped_after < TIMEOUT_S + 2, (sent, dropped_after)


def test_body_that_never_ends_is_a_408(server):
    """Before: 408 after a fixed 60 s whatever --timeout said."""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(_auth_head("POST", "/tokenize", "Content-Length: 100\r\n\r\n") + b'{"content": "a')
        t0 = time.monotonic()
        s.settimeout(15)
        status = s.recv(4096).split(b"\r\n", 1)[0]
        waited = time.monotonic() - t0
    assert status == b"HTTP/1.1 408 Request Timeout" and TIMEOUT_S - 0.5 < waited < TIMEOUT_S + 2


def test_stalled_reader_is_dropped(server):
    """A client that stops reading a big answer (the server's buffers full) is dropped --timeout
    later. Before: --timeout was ignored and the connection (a stream's slot with it) held for ever."""
    body = json.dumps({"content": "hello world " * 30000, "with_pieces": True}).encode()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", server.port))
        s.sendall(_auth_head("POST", "/tokenize", f"Content-Length: {len(body)}\r\n\r\n") + body)
        time.sleep(TIMEOUT_S + 3)  # answer ready, buffers full, then the write timeout
        s.settimeout(10)
        head = s.recv(4096)
        length = int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        received = len(head.split(b"\r\n\r\n", 1)[1])
        try:
            while True:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                received += len(chunk)
        except ConnectionResetError:
            pass
    assert 0 < received < length, (received, length)  # cut short, not merely slow
    assert _health_ok(server) < 1.0


def test_timeout_flag_is_checked():
    p = subprocess.run([sys.executable, "-m", "glmoe.server", "--timeout", "0"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "--timeout must be >= 1" in p.stderr


# --- out of file descriptors -----------------------------------------------------------------------

NOFILE = 64  # the server's RLIMIT_NOFILE: its connection cap is then 32, its spare descriptors ~55
N_CLIENTS = 120


def _server_with_nofile(model_path, nofile):
    """A llama-server whose RLIMIT_NOFILE is nofile (set by a small wrapper before it starts)."""
    srv = harness.ServerProcess.__new__(harness.ServerProcess)
    srv.port = harness.free_port()
    srv.url = f"http://127.0.0.1:{srv.port}"
    wrapper = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]),) * 2); "
               "sys.argv = ['llama-server'] + sys.argv[2:]; runpy.run_module('glmoe.server', run_name='__main__')")
    srv.proc = subprocess.Popen([sys.executable, "-c", wrapper, str(nofile), "-m", model_path, "--host", "127.0.0.1",
                                 "--port", str(srv.port), "-c", "1024", "-t", "1", "--timeout", "5"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    srv._wait_ready()
    return srv


def _answer(sock, deadline) -> bytes:
    """The status line and body of the one answer on sock (b"" if none came by deadline)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    if b"\r\n\r\n" not in data:
        return b""
    head, body = data.split(b"\r\n\r\n", 1)
    return head.split(b"\r\n", 1)[0] + b"\n" + body


def _content_length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    return int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]) if b"content-length: " in head else 0


def test_out_of_file_descriptors(model_path):
    """120 clients against a server allowed 64 descriptors. Before: asyncio logged a traceback per
    failed accept() (160 in 10 s), the log pipe filled and the server froze: 2 of 150 clients were
    answered, and /health still timed out once they had all gone. Now: clients over the cap get
    OpenAI's 503 body at once, the others 200, those that waited for a descriptor are answered as
    descriptors free; the log holds a line per kind of trouble per 5 s; /health answers after."""
    srv = _server_with_nofile(model_path, NOFILE)
    try:
        socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(N_CLIENTS)]
        time.sleep(0.5)  # the server has accepted what it can: its descriptors are spent
        for s in socks:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 20
        answers = [_answer(s, deadline) for s in socks]
        for s in socks:
            s.close()
        statuses = [a.split(b"\n", 1)[0] for a in answers]
        assert all(st in (b"HTTP/1.1 200 OK", b"HTTP/1.1 503 Service Unavailable") for st in statuses), statuses
        refused = [json.loads(a.split(b"\n", 1)[1]) for a, st in zip(answers, statuses) if b"503" in st]
        assert refused and statuses.count(b"HTTP/1.1 200 OK") >= 16
        err = refused[0]["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "unavailable_error"
        assert err["code"] == "too_many_connections"
        time.sleep(1.5)  # accept() is retried each second
        assert _health_ok(srv) < 2.0
    finally:
        srv.stop()
    log = srv.proc.stdout.read()
    assert "Traceback" not in log and "cannot accept connections: Too many open files" in log, log[-3000:]
    assert len(log.splitlines()) < 15, log[-3000:]


# --- JSON work off the event loop ------------------------------------------------------------------

def _post_raw(server, path, raw):
    return httpx.post(server.url + path, content=raw, timeout=60,
                      headers={"Authorization": f"Bearer {harness.API_KEY}", "Content-Type": "application/json"})


def test_health_answers_while_big_bodies_are_handled(server):
    """Three 1 MB /tokenize requests (a million token ids each way) and a 750 kB completion, at
    once. Before: /health waited up to 1.2-1.5 s (FastAPI encoding each answer with
    jsonable_encoder on the event loop: 0.5 s per answer). Now under 0.2 s."""
    text = "hello world " * 85000
    bodies = [("/tokenize", json.dumps({"content": text}).encode())] * 3 + \
             [("/v1/completions", json.dumps({"prompt": [1] * 250000, "max_tokens": 1}).encode())]
    worst, answers = 0.0, []

    def send_all():
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers.extend(pool.map(lambda pb: _post_raw(server, *pb), bodies))

    thread = threading.Thread(target=send_all)
    thread.start()
    while thread.is_alive():
        worst = max(worst, _health_ok(server))
        time.sleep(0.01)
    thread.join()
    assert [r.status_code for r in answers] == [200, 200, 200, 400]
    tokens = answers[0].json()["tokens"]
    assert len(tokens) > 100_000 and answers[1].json()["tokens"] == tokens
    assert worst < 0.2, worst


@pytest.mark.parametrize("raw, message", [
    (b'{"content": "' + b"a" * 100_000, "malformed JSON: Unterminated string"),
    (b'{"content": "' + b"a" * 100_000 + b'", }', "malformed JSON: Expecting property name"),
    (b'{"content": "' + b"\xff" * 100_000 + b'"}', None),
])
def test_big_malformed_bodies_are_400s(server, raw, message):
    """Bodies over the size parsed in a thread get the same 400s as small ones."""
    r = _post_raw(server, "/tokenize", raw)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    if message:
        assert r.json()["error"]["message"].startswith(message), r.text


def test_big_answers_are_plain_json():
    """Answers encoded in pieces are byte for byte what JSONResponse writes."""
    from starlette.responses import JSONResponse

    from glmoe.server.json_routes import json_bytes

    for value in [{"tokens": list(range(50_000))}, {"tokens": [{"id": i, "piece": 'é"\n\u2028'} for i in range(9000)]},
                  [[1.5, None, True, "a"]] * 9000, {"a": {"b": list(range(10_000)), "c": "x" * 300_000}},
                  {"t": (1, 2, 3) * 5000}, list(range(3 * 4096)), list(range(3 * 4096 + 1))]:
        assert json_bytes(value) == JSONResponse(value).body
    with pytest.raises(ValueError):
        json_bytes({"x": [float("nan")] * 10_000})


class EchoBody(BaseModel):  # at module level: FastAPI resolves the endpoint's annotations here
    content: str


def test_big_bodies_are_parsed_in_a_thread(monkeypatch):
    """The route class hands bodies over 64 KiB to a thread and FastAPI uses what it parsed (it
    sets Starlette's cached Request._json: a Starlette that stops reading it would parse twice)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from glmoe.server import json_routes

    parsed_in_thread = []
    real_loads = json.loads

    async def spy(fn, *args):  # json.loads, maybe patched below: the real one runs
        parsed_in_thread.append(len(args[0]))
        return real_loads(*args)

    def loads_on_loop(*a, **k):
        raise AssertionError("parsed again on the event loop")

    app = FastAPI()
    app.router.route_class = json_routes.OffLoopJSONRoute

    @app.post("/echo")
    async def echo(body: EchoBody):
        return {"n": len(body.content)}

    monkeypatch.setattr(json_routes, "run_in_threadpool", spy)
    client = TestClient(app)
    assert client.post("/echo", json={"content": "a" * 10}).json() == {"n": 10}
    assert parsed_in_thread == []
    monkeypatch.setattr(json, "loads", loads_on_loop)  # what Starlette's Request.json() calls
    assert real_loads(client.post("/echo", json={"content": "a" * 100_000}).content) == {"n": 100_000}
    assert parsed_in_thread == [100_000 + len('{"content":""}')]


def test_connections_of_the_listening_socket_send_without_delay():
    """Streamed chunks go out as written: the connections accepted on llama-server's socket have
    Nagle's algorithm off (TCP_NODELAY), which asyncio sets only for a socket of protocol TCP; with
    it on, each chunk after the head waited for the client's delayed ACK."""
    import asyncio

    from glmoe.server.cli import listen_socket

    async def accepted_nodelay() -> int:
        sock = listen_socket("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                s = transport.get_extra_info("socket")
                seen.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        client = socket.create_connection(sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            client.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0
