"""The classic asyncio relay: the well-known Python design that most users start from.

It follows the design of the well-known tutorial ("a Websocket PUBSUB server with Redis and
asyncio"): two WebSocket servers, one that PUBLISHes what clients send and one that gives each
subscriber its own Redis subscription, with the `websockets` package and redis.asyncio (the
successor of aioredis), plus hiredis as the tutorial had. It is a benchmark peer of
lightrelay, written to be a fair baseline, not a strawman:

- one shared Redis client for publishing (not a new connection per message as in the
  tutorial), and no sleep between messages;
- payloads are relayed as bytes (binary frames), not decoded to text, like lightrelay;
- the publish server answers the `lightrelay.ack` subprotocol (one text frame with Redis's
  receiver count per message, in order), so the ingest benchmark can run in ack mode too.

Channel = PREFIX + request path, as in lightrelay and the tutorial.

    python relay.py publish   --port 8765 --redis redis://127.0.0.1:6379
    python relay.py subscribe --port 8767 --redis redis://127.0.0.1:6379
"""

import argparse
import asyncio
import logging
import signal

import redis.asyncio as aioredis
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

ACK = "lightrelay.ack"


def channel_of(websocket, prefix):
    return prefix + websocket.request.path.split("?", 1)[0]


async def publish_handler(websocket, client, prefix):
    """Each message a client sends becomes one PUBLISH on its channel."""
    channel = channel_of(websocket, prefix)
    ack = websocket.subprotocol == ACK
    try:
        async for message in websocket:
            receivers = await client.publish(channel, message)
            if ack:
                await websocket.send(str(receivers))
    except ConnectionClosed:
        pass


async def subscribe_handler(websocket, client, prefix):
    """One Redis subscription per WebSocket client: every message on it is sent on."""
    channel = channel_of(websocket, prefix)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)

    async def forward():
        async for message in pubsub.listen():
            if message["type"] == "message":
                await websocket.send(message["data"])

    forwarding = asyncio.create_task(forward())
    try:
        # Until the client goes (or forwarding fails because it went).
        done, _ = await asyncio.wait(
            [forwarding, asyncio.create_task(websocket.wait_closed())],
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        forwarding.cancel()
        try:
            await pubsub.unsubscribe(channel)
        except Exception:
            pass
        await pubsub.aclose()


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["publish", "subscribe"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--prefix", default="lightlevel")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    client = aioredis.from_url(args.redis)
    if args.role == "publish":
        async def handler(ws):
            await publish_handler(ws, client, args.prefix)
        subprotocols = [ACK]
    else:
        async def handler(ws):
            await subscribe_handler(ws, client, args.prefix)
        subprotocols = None

    def select(connection, offered):
        return ACK if subprotocols and ACK in offered else None

    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(
        handler,
        args.host,
        args.port,
        select_subprotocol=select,
        compression=None,
        max_size=2**21,
        backlog=4096,
    ):
        print(f"listening on {args.host}:{args.port}", flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main())
