"""Real applications, unchanged, on kqfast.Loop: uvicorn (httptools and h11, plain HTTP and a
WebSocket upgrade through websockets) started the way its users start it, aiohttp's server
and client, websockets' server and client, and asyncio streams.  Each checks the bytes, and
that the connections really are kqfast's (the loop's type, kqfast.Transport, streams in the
core's table), not a fallback."""
from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import websockets
from aiohttp import web

import kqfast

pytestmark = pytest.mark.timeout(60)

APPS = Path(__file__).resolve().parent / "apps"
LOOP = "kqfast.loop.Loop"


@pytest.fixture(params=["httptools", "h11"])
def uvicorn_server(request):
    """uvicorn serving apps/asgi_hello.py with --loop kqfast:new_event_loop on a socket this
    test bound (--fd): connections queue until it accepts, so no waiting for start-up."""
    listener = socket.create_server(("127.0.0.1", 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "asgi_hello:app", "--loop", "kqfast:new_event_loop",
         "--http", request.param, "--fd", str(listener.fileno()), "--log-level", "warning"],
        cwd=APPS, pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    address = listener.getsockname()
    listener.close()  # the child holds its copy
    yield address
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err


def test_uvicorn_serves_https_on_kqfast(tls_files):
    """uvicorn --ssl-certfile/--ssl-keyfile on kqfast.Loop: its TLS is the loop's (the
    engine, where it runs), requests answered over it."""
    cert, key, client_context = tls_files
    listener = socket.create_server(("127.0.0.1", 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "asgi_hello:app", "--loop", "kqfast:new_event_loop",
         "--fd", str(listener.fileno()), "--ssl-certfile", str(cert), "--ssl-keyfile",
         str(key), "--log-level", "warning"],
        cwd=APPS, pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    address = listener.getsockname()
    listener.close()
    try:
        conn = http.client.HTTPSConnection(*address, timeout=20, context=client_context)
        for i in range(5):
            conn.request("POST", f"/tls/{i}", body=b"secret %d" % i)
            answer = json.loads(conn.getresponse().read())
            assert answer["loop"] == LOOP and answer["core_streams"] >= 1
            assert answer["echo"] == f"secret {i}"
        conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err


def test_aiohttp_over_https_on_kqfast(tls):
    """aiohttp's server and client over TLS on one kqfast.Loop: both ends' records go
    through the core (the SSL transport sits on kqfast.Transport)."""
    under = []

    async def handler(request):
        under.append(type(request.transport._ssl_protocol._transport))
        return web.Response(body=await request.read())

    async def main():
        app = web.Application(client_max_size=4 << 20)
        app.router.add_post("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls[0])
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    body = os.urandom(1 << 20)
                    async with session.post(f"https://localhost:{port}/", data=body,
                                            ssl=tls[1]) as resp:
                        assert await resp.read() == body
        finally:
            await runner.cleanup()

    kqfast.run(main())
    assert under == [kqfast.Transport] * 3


def get(address, path: str, body: bytes = b"", keep: http.client.HTTPConnection | None = None):
    conn = keep or http.client.HTTPConnection(*address, timeout=20)
    conn.request("POST" if body else "GET", path, body=body or None)
    response = conn.getresponse()
    assert response.status == 200
    answer = json.loads(response.read())
    if keep is None:
        conn.close()
    return answer


def test_uvicorn_serves_http_on_kqfast(uvicorn_server):
    """Requests on one kept-alive connection and on fresh ones, bodies echoed byte for byte."""
    keep = http.client.HTTPConnection(*uvicorn_server, timeout=20)
    try:
        for i in range(20):
            body = os.urandom(1000 + i * 997).hex().encode()
            answer = get(uvicorn_server, f"/echo/{i}", body, keep=keep)
            assert answer["loop"] == LOOP and answer["core_streams"] >= 1
            assert answer["path"] == f"/echo/{i}" and answer["echo"] == body.decode()
        for i in range(5):
            assert get(uvicorn_server, f"/fresh/{i}")["path"] == f"/fresh/{i}"
    finally:
        keep.close()


def test_uvicorn_websocket_upgrade_on_kqfast(uvicorn_server):
    """uvicorn's WebSocket upgrade (set_protocol on a kqfast transport), with a websockets
    client that runs on kqfast.Loop too."""
    host, port = uvicorn_server

    async def talk():
        async with websockets.connect(f"ws://{host}:{port}/ws") as ws:
            assert isinstance(ws.transport, kqfast.Transport)
            replies = []
            for i in range(10):
                await ws.send(f"message {i}")
                replies.append(json.loads(await ws.recv()))
            return replies

    replies = kqfast.run(talk())
    assert [r["echo"] for r in replies] == [f"message {i}" for i in range(10)]
    assert all(r["loop"] == LOOP and r["core_streams"] >= 1 for r in replies)


def test_aiohttp_server_and_client_on_kqfast():
    """aiohttp's web server and ClientSession on one kqfast.Loop: 1 MiB bodies both ways; the
    server's transport is kqfast's, and the core holds both ends of each connection."""
    core_streams = []

    async def handler(request):
        assert isinstance(request.transport, kqfast.Transport)
        core_streams.append(asyncio.get_running_loop()._reactor.stats()["connections_current"])
        data = await request.read()
        return web.Response(body=hashlib.sha256(data).hexdigest().encode() + data)

    async def main():
        app = web.Application(client_max_size=4 << 20)
        app.router.add_post("/hash", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session:
                for i in range(5):
                    body = os.urandom(1 << 20)
                    async with session.post(f"http://127.0.0.1:{port}/hash", data=body) as resp:
                        answer = await resp.read()
                    assert answer == hashlib.sha256(body).hexdigest().encode() + body
        finally:
            await runner.cleanup()
        return type(asyncio.get_running_loop())

    assert kqfast.run(main()) is kqfast.Loop
    assert len(core_streams) == 5 and min(core_streams) >= 2, core_streams


def test_websockets_server_and_client_on_kqfast():
    """websockets' own server and client on one kqfast.Loop, text and 1 MiB binary frames."""
    seen_transports = []

    async def echo(ws):
        seen_transports.append(type(ws.transport))
        async for message in ws:
            await ws.send(message)

    async def main():
        async with websockets.serve(echo, "127.0.0.1", 0, max_size=None) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
                for i in range(10):
                    await ws.send(f"text {i}")
                    assert await ws.recv() == f"text {i}"
                blob = os.urandom(1 << 20)
                await ws.send(blob)
                assert await ws.recv() == blob

    kqfast.run(main())
    assert seen_transports == [kqfast.Transport]


def test_asyncio_streams_on_kqfast():
    """start_server and open_connection: 50 clients at once, 256 KiB each through drain(),
    every byte back in order; the writers' transports are kqfast's."""

    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def client(port, seed):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert isinstance(writer.transport, kqfast.Transport)
        payload = hashlib.sha256(seed).digest() * 8192
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        back = await reader.read()
        writer.close()
        await writer.wait_closed()
        return back == payload

    async def main():
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            results = await asyncio.gather(*(client(port, b"%d" % i) for i in range(50)))
        return results

    assert kqfast.run(main()) == [True] * 50


def readme_snippet(marker: str) -> str:
    """The python block that follows `<!-- marker -->` in the README."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text.split(f"<!-- {marker} -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_uvicorn_server_inside_kqfast_run(tmp_path):
    """The README's way for uvicorn older than 0.36 (whose --loop takes no factory), run as
    written with the installed uvicorn: uvicorn.Server inside kqfast.run serves on kqfast's
    loop and stops on Ctrl-C."""
    code = readme_snippet("uvicorn-inside-kqfast-run")
    assert '"app:app"' in code and "port=8000" in code
    code = code.replace('"app:app"', '"asgi_hello:app"').replace("port=8000", "port=0")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=APPS, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            if "Uvicorn running on http://127.0.0.1:" in line:
                port = int(line.split("http://127.0.0.1:")[1].split()[0])
                break
        assert port, "uvicorn did not start"
        assert get(("127.0.0.1", port), "/older")["loop"] == LOOP
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
