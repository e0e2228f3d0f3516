"""Sandbox ports through the gateway: a real gateway (process backend) on uvicorn, the SDK over its websocket,
servers started in sandboxes with commands.run(background=True), reached with the Host from get_host()
(httpx sending it to the gateway's address, curl resolving *.localhost itself, a websockets client)."""

from __future__ import annotations

import asyncio
import shutil
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio
from gateway_harness import started_gateway
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from forkd import AsyncSandbox
from forkd_gateway._app import running_server

pytestmark = pytest.mark.asyncio(loop_scope="module")

HTTP_PORT = 8000
APP_PORT = 8765

# An HTTP echo, a slow page and a websocket echo, with the standard library only (the template has no
# `websockets`).
APP = r"""
import base64, hashlib, struct, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def read_exact(f, n):
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return data


def read_frame(f):
    b1, b2 = read_exact(f, 2)
    n = b2 & 127
    if n == 126:
        n = struct.unpack(">H", read_exact(f, 2))[0]
    elif n == 127:
        n = struct.unpack(">Q", read_exact(f, 8))[0]
    mask = read_exact(f, 4) if b2 & 128 else b""
    data = read_exact(f, n)
    if mask and n:
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        data = (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")
    return b1 >> 7, b1 & 15, data


def write_frame(f, opcode, data):
    n = len(data)
    if n < 126:
        head = struct.pack(">BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack(">BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 127, n)
    f.write(head + data)
    f.flush()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/ws":
            return self.websocket()
        if self.path == "/forever":  # a close-delimited body that never ends; how much got out?
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            sent, block = 0, b"z" * 65536
            try:
                while True:
                    self.wfile.write(block)
                    sent += len(block)
            except OSError:
                pass
            with open("/tmp/forever-sent", "w") as f:
                f.write(str(sent))
            self.close_connection = True
            return
        if self.path == "/slow":
            open("/tmp/slow-started", "w").close()
            time.sleep(60)
        body = ("host=" + self.headers["Host"]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(201)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):  # a chunked upload, answered with what arrived
        body = b""
        while True:
            size = int(self.rfile.readline().strip(), 16)
            if size == 0:
                self.rfile.readline()
                break
            body += self.rfile.read(size)
            self.rfile.readline()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"] + GUID
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())
        self.end_headers()
        self.close_connection = True
        opcode, parts = 1, []
        while True:
            fin, op, data = read_frame(self.rfile)
            if op == 8:
                write_frame(self.wfile, 8, data)
                return
            if op == 9:
                write_frame(self.wfile, 10, data)
                continue
            if op in (1, 2):
                opcode, parts = op, [data]
            elif op == 0:
                parts.append(data)
            if not fin:
                continue
            message = b"".join(parts)
            if message == b"bye":
                write_frame(self.wfile, 8, struct.pack(">H", 4002) + b"done")
                while read_frame(self.rfile)[1] != 8:
                    pass
                return
            write_frame(self.wfile, opcode, message)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(template_store, tmp_path_factory):
    async with started_gateway(template_store, tmp_path_factory.mktemp("proxy") / "state") as gateway:
        async with running_server(gateway, "127.0.0.1", 0) as url:
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:
                yield gateway, url, http


async def new_sandbox(url: str) -> AsyncSandbox:
    return await AsyncSandbox.create(url=url)


async def wait_listening(http: httpx.AsyncClient, host: str, path: str = "/") -> httpx.Response:
    """Poll through the proxy until the server answers (502 "nothing listens" until then)."""
    for _ in range(500):
        res = await http.get(path, headers={"Host": host})
        if not (res.status_code == 502 and "nothing listens" in res.text):
            return res
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing listened behind {host}: {res.status_code} {res.text}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app_sandbox(gw):
    _gateway, url, http = gw
    sbx = await new_sandbox(url)
    await sbx.files.write("/tmp/app.py", APP)
    await sbx.commands.run(f"python3 /tmp/app.py {APP_PORT}", background=True)
    await wait_listening(http, sbx.get_host(APP_PORT))
    yield sbx
    await sbx.kill()


async def test_get_host_is_a_localhost_name_for_a_loopback_gateway(gw, app_sandbox):
    _gateway, url, _http = gw
    port = urlsplit(url).port
    assert app_sandbox.get_host(3000) == f"3000-{app_sandbox.sandbox_id}.localhost:{port}"


async def test_http_server_file_via_httpx_and_curl(gw):
    _gateway, url, http = gw
    sbx = await new_sandbox(url)
    try:
        await sbx.files.write("/tmp/www/hello.txt", "hello from the sandbox\n")
        await sbx.commands.run(
            f"cd /tmp/www && python3 -m http.server {HTTP_PORT} --bind 127.0.0.1", background=True
        )
        host = sbx.get_host(HTTP_PORT)
        await wait_listening(http, host)
        res = await http.get("/hello.txt", headers={"Host": host})
        assert res.status_code == 200 and res.text == "hello from the sandbox\n"
        missing = await http.get("/nope.txt", headers={"Host": host})
        assert missing.status_code == 404  # the sandbox's server answered, not the gateway
        if shutil.which("curl"):  # curl resolves *.localhost to loopback by itself (>= 7.78)
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--noproxy", "*", f"http://{host}/hello.txt",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            assert proc.returncode == 0, err
            assert out == b"hello from the sandbox\n"
    finally:
        await sbx.kill()


async def test_the_gateway_routes_still_answer_their_own_host(gw):
    _gateway, _url, http = gw
    assert (await http.get("/health")).json()["status"] == "ok"


async def test_post_5mb_round_trip(gw, app_sandbox):
    _gateway, _url, http = gw
    body = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    res = await http.post("/echo", content=body, headers={"Host": app_sandbox.get_host(APP_PORT)})
    assert res.status_code == 201
    assert res.headers["content-type"] == "application/octet-stream"
    assert res.content == body


async def test_a_chunked_upload_is_streamed_up(gw, app_sandbox):
    _gateway, _url, http = gw
    parts = [b"first ", b"x" * 200_000, b" last"]

    async def body():
        for part in parts:
            yield part
            await asyncio.sleep(0)

    res = await http.put("/up", content=body(), headers={"Host": app_sandbox.get_host(APP_PORT)})
    assert res.status_code == 200 and res.content == b"".join(parts)


async def test_a_slow_client_holds_the_server_back_and_leaving_stops_it(gw, app_sandbox):
    _gateway, _url, http = gw
    async with http.stream("GET", "/forever", headers={"Host": app_sandbox.get_host(APP_PORT)}) as res:
        got = 0
        async for chunk in res.aiter_raw():
            got += len(chunk)
            if got >= 1024 * 1024:
                break
        await asyncio.sleep(0.3)  # reading nothing
    # The client went away: the gateway closes the tunnel, the server's next write fails.
    for _ in range(500):
        if await app_sandbox.files.exists("/tmp/forever-sent"):
            break
        await asyncio.sleep(0.02)
    sent = int(await app_sandbox.files.read("/tmp/forever-sent"))
    # Socket buffers and the 1 MiB tunnel window hold a few MB; without backpressure it would be far more.
    assert got <= sent < 64 * 1024 * 1024


async def test_the_server_sees_the_clients_host(gw, app_sandbox):
    _gateway, _url, http = gw
    host = app_sandbox.get_host(APP_PORT)
    res = await http.get("/", headers={"Host": host})
    assert res.text == f"host={host}"


async def test_websocket_echo_and_close_codes(gw, app_sandbox):
    _gateway, url, _http = gw
    gw_port = urlsplit(url).port
    uri = f"ws://{app_sandbox.get_host(APP_PORT)}/ws"
    async with ws_connect(uri, host="127.0.0.1", port=gw_port, proxy=None, max_size=None) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        blob = bytes(range(256)) * 1200  # 300 KB
        await ws.send(blob)
        assert await ws.recv() == blob
        await ws.close(4001, "client done")
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 4001
    # The server closes first: its code and reason reach the client.
    async with ws_connect(uri, host="127.0.0.1", port=gw_port, proxy=None) as ws:
        await ws.send("bye")
        with pytest.raises(ConnectionClosed) as exc:
            await ws.recv()
    assert exc.value.rcvd is not None and (exc.value.rcvd.code, exc.value.rcvd.reason) == (4002, "done")


async def test_websocket_to_a_closed_port_is_refused_with_502(gw, app_sandbox):
    _gateway, url, _http = gw
    uri = f"ws://{app_sandbox.get_host(9)}/ws"
    with pytest.raises(InvalidStatus) as exc:
        async with ws_connect(uri, host="127.0.0.1", port=urlsplit(url).port, proxy=None):
            pass
    assert exc.value.response.status_code == 502


async def test_unknown_sandbox_is_404_and_closed_port_is_502(gw, app_sandbox):
    gateway, url, http = gw
    res = await http.get("/", headers={"Host": f"8000-sbx-doesnotexist.localhost:{urlsplit(url).port}"})
    assert res.status_code == 404 and res.text.strip() == "sandbox sbx-doesnotexist not found"
    res = await http.get("/", headers={"Host": app_sandbox.get_host(9)})
    assert res.status_code == 502
    assert res.text.strip() == f"nothing listens on port 9 in sandbox {app_sandbox.sandbox_id}"
    metrics = (await http.get("/metrics")).text
    assert 'forkd_port_requests_total{kind="http",outcome="not_found"}' in metrics
    assert 'forkd_port_requests_total{kind="http",outcome="refused"}' in metrics
    assert 'forkd_port_requests_total{kind="http",outcome="ok"}' in metrics


async def test_sandbox_killed_mid_request_is_502_then_404(gw):
    _gateway, url, http = gw
    sbx = await new_sandbox(url)
    await sbx.files.write("/tmp/app.py", APP)
    await sbx.commands.run(f"python3 /tmp/app.py {APP_PORT}", background=True)
    host = sbx.get_host(APP_PORT)
    await wait_listening(http, host)
    pending = asyncio.ensure_future(http.get("/slow", headers={"Host": host}))
    for _ in range(500):
        if await sbx.files.exists("/tmp/slow-started"):
            break
        await asyncio.sleep(0.02)
    await sbx.kill()
    res = await asyncio.wait_for(pending, 20)
    assert res.status_code == 502 and "stopped" in res.text
    res = await http.get("/", headers={"Host": host})
    assert res.status_code == 404 and sbx.sandbox_id in res.text


async def test_two_sandboxes_on_the_same_port_each_reach_their_own(gw):
    _gateway, url, http = gw
    a, b = await asyncio.gather(new_sandbox(url), new_sandbox(url))
    try:
        for sbx, name in ((a, "a"), (b, "b")):
            await sbx.files.write("/tmp/www/who.txt", name)
            await sbx.commands.run(
                f"cd /tmp/www && python3 -m http.server {HTTP_PORT} --bind 127.0.0.1", background=True
            )
        for sbx in (a, b):
            await wait_listening(http, sbx.get_host(HTTP_PORT))
        got = await asyncio.gather(
            *(http.get("/who.txt", headers={"Host": s.get_host(HTTP_PORT)}) for s in (a, b, a, b))
        )
        assert [r.text for r in got] == ["a", "b", "a", "b"]
    finally:
        await asyncio.gather(a.kill(), b.kill())
