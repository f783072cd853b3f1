"""An ASGI app for the uvicorn tests: every answer says which loop serves it and how many
streams kqfast's core holds, so a test can tell kqfast's transports from a fallback."""
import asyncio
import json


def _where() -> dict:
    loop = asyncio.get_running_loop()
    reactor = getattr(loop, "_reactor", None)
    return {"loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
            "core_streams": reactor.stats()["connections_current"] if reactor else None}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        answer = dict(_where(), path=scope["path"], echo=body.decode("latin-1"))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            reply = dict(_where(), echo=message.get("text"))
            await send({"type": "websocket.send", "text": json.dumps(reply)})
