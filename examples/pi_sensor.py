#!/usr/bin/env python3
"""Publish a light level to lightrelay every few seconds: the Raspberry Pi side.

Reads a number from a file each --interval seconds (an IIO light sensor's sysfs value such as
/sys/bus/iio/devices/iio:device0/in_illuminance_raw, or any file a sensor script rewrites), or
simulates a sine between 200 and 800 when no --file is given, and sends each reading as one
text message over a WebSocket to the publish server, which PUBLISHes it on Redis exactly as
read: `417` in the file is `417` on `lightlevel/office`.

    python3 -m venv ~/lightrelay-venv
    ~/lightrelay-venv/bin/pip install -r requirements.txt
    ~/lightrelay-venv/bin/python pi_sensor.py ws://relay.example:8766/office \\
        --file /sys/bus/iio/devices/iio:device0/in_illuminance_raw --interval 5

A relay with tokens turned on (SPEC §8, `--auth publish`) needs one that allows the path:
mint it on the server with `lightrelay token --secret-file /etc/lightrelay/jwt-secret --pub
'/office' --ttl 365d` and give it as LIGHTRELAY_TOKEN=... (or --token); it is sent as
`Authorization: Bearer`. A refused token (HTTP 401 or 403) is reported in one line and ends the
script with exit 1: retrying would not change the answer.

When the relay is away it reconnects with exponential back-off (1 s doubling to 30 s), keeping
up to --buffer readings meanwhile (the oldest are dropped beyond that, and counted). It offers
the `lightrelay.ack` subprotocol: each reading is kept until the relay says Redis has it, and
resent after a reconnect, so a relay restart loses nothing (a reading whose ack was lost with
the connection may arrive twice); a connection that acknowledges nothing for 30 s is dropped
and made again. With --no-ack (a relay or proxy that does not speak lightrelay.ack) a reading
counts as sent once it is written to the socket.

It obeys its downlink (SPEC §10): a message such as `{"interval": 2}` sent to its path
(`curl -d '{"interval":2}' http://relay.example:8767/down/office` on the subscribe server, or
PUBLISH on `lightlevel/office:down`) sets the seconds between readings (more than 0, at most
86400) from then on, and is acknowledged by publishing `{"interval": 2}` on its own channel
among the readings. Other downlink messages are logged and ignored. With lightrelay.ack the
downlink comes in binary frames (text frames are the acks); without it, in any frame.

Exit codes: 0 after --count readings were sent (and acknowledged), or on Ctrl-C or SIGTERM;
1 when the relay refuses us for good (HTTP 4xx such as 401/403 for the token, or no ack
subprotocol);
2 for bad arguments. Needs Python 3.9+ and the `websockets` package (requirements.txt).
"""

import argparse
import asyncio
import collections
import json
import logging
import math
import os
import random
import re
import signal
import sys
import time
import urllib.parse

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

ACK_PROTOCOL = "lightrelay.ack"
DEFAULT_URL = "ws://127.0.0.1:8765/office"
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 30.0
WINDOW = 64  # readings sent but not yet acknowledged, at most
ACK_TIMEOUT = 30.0  # longer than the relay's --redis-timeout (10 s), after which it closes with 1013
MAX_INTERVAL = 86400.0  # the longest interval a downlink may set, in seconds
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")

log = logging.getLogger("pi_sensor")


def file_reader(path):
    """A reading is the file's content without surrounding white space; it must be a number."""

    def read():
        with open(path, "rb") as f:
            text = f.read(256).decode("ascii").strip()
        if not NUMBER.fullmatch(text):
            raise ValueError(f"{path} holds {text[:40]!r}, not a number")
        return text

    return read


def sine_reader(period):
    """A simulated sensor: 500 +/- 300 along a sine of `period` seconds, one decimal."""
    start = time.monotonic()

    def read():
        t = time.monotonic() - start
        return f"{500 + 300 * math.sin(2 * math.pi * t / period):.1f}"

    return read


class Outbox:
    """Readings waiting to go out, oldest first. The first `in_flight` of them were sent on
    the current connection and wait for their ack; a reconnect sends them again."""

    def __init__(self, limit):
        self.items = collections.deque()
        self.limit = limit
        self.in_flight = 0
        self.finished = False  # no more readings will come (--count reached)
        self.sent = 0
        self.dropped = 0
        self.changed = asyncio.Event()
        self.progress_at = 0.0  # when the oldest reading in flight was sent, or the last ack came

    def add(self, reading):
        if len(self.items) >= self.limit:
            if self.in_flight < len(self.items):
                del self.items[self.in_flight]  # the oldest reading not sent yet
            else:
                reading = None  # all of them are on the wire: the new one has no room
            self.dropped += 1
            log.warning("buffer full (%d readings): dropped one, %d so far", self.limit, self.dropped)
        if reading is not None:
            self.items.append(reading)
        self.changed.set()

    def done_one(self):
        """The oldest reading in flight is sent (acknowledged, unless --no-ack)."""
        self.items.popleft()
        self.in_flight -= 1
        self.sent += 1
        self.progress_at = asyncio.get_running_loop().time()
        self.changed.set()

    def finish(self):
        self.finished = True
        self.changed.set()


class Schedule:
    """The seconds between readings, which a downlink may change while the producer waits."""

    def __init__(self, interval):
        self.interval = interval
        self.changed = asyncio.Event()

    def set(self, interval):
        self.interval = interval
        self.changed.set()


def interval_asked(message):
    """The interval a downlink message `{"interval": S}` asks for, or None (not such a message,
    or S out of range)."""
    try:
        asked = json.loads(message)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(asked, dict):
        return None
    interval = asked.get("interval")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        return None
    if not 0 < interval <= MAX_INTERVAL:
        return None
    return float(interval)


def obey(message, schedule, outbox):
    """A downlink message: set the interval it asks for, and acknowledge it on the channel."""
    interval = interval_asked(message)
    if interval is None:
        log.warning("ignored a downlink message: not {\"interval\": S} with 0 < S <= %g", MAX_INTERVAL)
        return
    log.info("downlink: a reading every %g s from now on", interval)
    schedule.set(interval)
    outbox.add(json.dumps({"interval": interval}))


async def produce(read, schedule, count, outbox):
    """Take a reading every `schedule.interval` seconds (on a fixed schedule) until `count`
    were taken. A new interval starts a new schedule: the next reading is that long after it
    came."""
    loop = asyncio.get_running_loop()
    taken = 0
    due = loop.time()
    while count is None or taken < count:
        try:
            reading = await asyncio.to_thread(read)
        except (OSError, ValueError) as e:
            log.warning("no reading: %s", e)
        else:
            log.debug("reading %s", reading)
            outbox.add(reading)
            taken += 1
            if count is not None and taken >= count:
                break
        due += schedule.interval
        while True:
            if schedule.changed.is_set():
                schedule.changed.clear()
                due = loop.time() + schedule.interval
            delay = due - loop.time()
            if delay < 0:  # a slow read: start the schedule again from now
                due, delay = loop.time(), 0
            try:
                await asyncio.wait_for(schedule.changed.wait(), delay)
            except asyncio.TimeoutError:
                break
    outbox.finish()


async def read_acks(ws, outbox, ack, schedule):
    """Each text frame the publish server sends under lightrelay.ack acknowledges the oldest
    reading in flight; the other frames are the downlink (binary under lightrelay.ack, any
    without it). Returns when the connection closes cleanly; raises when it breaks."""
    async for message in ws:
        if not ack or not isinstance(message, str):
            obey(message, schedule, outbox)
            continue
        if outbox.in_flight == 0:
            raise RuntimeError("an ack for nothing: is this a lightrelay publish server?")
        outbox.done_one()


async def send_all(ws, outbox, ack, schedule):
    """Send readings as they come. True once every reading was sent (and acknowledged) and no
    more will come; False when the connection ended first. With acks, a connection that
    acknowledges nothing for ACK_TIMEOUT while readings are in flight is given up."""
    loop = asyncio.get_running_loop()
    outbox.in_flight = 0
    acks = asyncio.ensure_future(read_acks(ws, outbox, ack, schedule))
    try:
        while True:
            while outbox.in_flight < min(len(outbox.items), WINDOW):
                reading = outbox.items[outbox.in_flight]
                if outbox.in_flight == 0:
                    outbox.progress_at = loop.time()
                outbox.in_flight += 1
                await ws.send(reading)
                if not ack:
                    outbox.done_one()
            if outbox.finished and not outbox.items:
                await ws.close()
                return True
            outbox.changed.clear()
            changed = asyncio.ensure_future(outbox.changed.wait())
            timeout = None
            if ack and outbox.in_flight:
                timeout = max(0.0, outbox.progress_at + ACK_TIMEOUT - loop.time())
            done, _ = await asyncio.wait({changed, acks}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            if acks in done:
                acks.result()  # raises if the connection broke
                return False
            if ack and outbox.in_flight and loop.time() >= outbox.progress_at + ACK_TIMEOUT:
                raise TimeoutError(f"no ack for {ACK_TIMEOUT:.0f} s: is this the publish server?")
    finally:
        acks.cancel()
        if acks.done() and not acks.cancelled():
            acks.exception()  # seen: the connection's end is handled by our caller


def shown(url):
    """The URL as logged: the value of a token= query parameter is hidden."""
    parts = urllib.parse.urlsplit(url)
    if not parts.query:
        return url
    query = "&".join("token=..." if p.startswith("token=") else p for p in parts.query.split("&"))
    return urllib.parse.urlunsplit(parts._replace(query=query))


REFUSALS = {
    401: "the relay wants a valid token (--token or LIGHTRELAY_TOKEN)",
    403: "the token does not allow publishing on this path",
}


async def publish(url, ack, outbox, schedule, token=None):
    """Connect, send, reconnect with back-off; the exit code once there is nothing left to do."""
    delay = BACKOFF_FIRST
    headers = {"Authorization": f"Bearer {token}"} if token else None
    url_shown = shown(url)
    while True:
        try:
            async with connect(
                url,
                additional_headers=headers,
                subprotocols=[ACK_PROTOCOL] if ack else None,
                open_timeout=10,
                close_timeout=5,
                ping_interval=20,
                ping_timeout=20,
                max_size=64 * 1024,
            ) as ws:
                if ack and ws.subprotocol != ACK_PROTOCOL:
                    log.error("%s did not accept the %s subprotocol: is it the publish server?", url_shown, ACK_PROTOCOL)
                    return 1
                log.info("connected to %s%s", url_shown, " (acknowledged)" if ack else "")
                delay = BACKOFF_FIRST
                if await send_all(ws, outbox, ack, schedule):
                    return 0
                log.warning("the relay closed the connection")
        except InvalidStatus as e:
            status = e.response.status_code
            body = e.response.body.decode("utf-8", "replace").strip() if e.response.body else ""
            body = body.splitlines()[0][:200] if body else ""
            if 400 <= status < 500 and status not in (408, 429):
                # Permanent: a reconnect would be refused the same way. 401/403: the token.
                hint = f" ({REFUSALS[status]})" if status in REFUSALS else ""
                log.error("%s refused us: HTTP %d %s%s", url_shown, status, body, hint)
                return 1
            log.warning("%s answered HTTP %d %s", url_shown, status, body)
        except (OSError, TimeoutError, asyncio.TimeoutError, WebSocketException, RuntimeError) as e:
            log.warning("connection to %s: %s", url_shown, str(e) or type(e).__name__)
        outbox.in_flight = 0
        wait = delay * random.uniform(0.75, 1.0)  # jitter: many sensors don't all return at once
        log.info("reconnecting in %.1f s (%d readings waiting)", wait, len(outbox.items))
        await asyncio.sleep(wait)
        delay = min(BACKOFF_CAP, delay * 2)


async def run(args):
    outbox = Outbox(args.buffer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not on this platform: KeyboardInterrupt
            pass
    read = file_reader(args.file) if args.file else sine_reader(args.period)
    schedule = Schedule(args.interval)
    producer = asyncio.ensure_future(produce(read, schedule, args.count, outbox))
    publisher = asyncio.ensure_future(publish(args.url, args.ack, outbox, schedule, args.token))
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({publisher, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = publisher.result() if publisher.done() else 0
    if stop.is_set():
        log.info("stopping")
    for task in (producer, publisher, stopper):
        task.cancel()
    await asyncio.gather(producer, publisher, stopper, return_exceptions=True)
    waiting = len(outbox.items)
    log.info(
        "%d readings sent%s%s",
        outbox.sent,
        f", {waiting} not sent" if waiting else "",
        f", {outbox.dropped} dropped (buffer full)" if outbox.dropped else "",
    )
    return code


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Publish a light level to lightrelay every few seconds.",
        epilog="example: %(prog)s ws://relay.example:8766/office "
        "--file /sys/bus/iio/devices/iio:device0/in_illuminance_raw --interval 5",
    )
    parser.add_argument(
        "url", nargs="?",
        help=f"the publish server and path (default: {DEFAULT_URL}); ws:// or wss://",
    )
    parser.add_argument("--url", dest="url_option", metavar="URL", help="the same as the URL argument")
    parser.add_argument("--file", "-f", help="read the level from this file (default: a simulated sine)")
    parser.add_argument("--interval", "-i", type=float, default=5.0, help="seconds between readings (default: %(default)s)")
    parser.add_argument("--count", "-n", type=int, help="stop after this many readings were sent")
    parser.add_argument(
        "--no-ack", dest="ack", action="store_false",
        help=f"do not use the {ACK_PROTOCOL} subprotocol (then a reading is sent once written, not once acknowledged)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("LIGHTRELAY_TOKEN") or None,
        help="a token from `lightrelay token`, sent as Authorization: Bearer (default: $LIGHTRELAY_TOKEN, "
        "which keeps it out of the process list)",
    )
    parser.add_argument("--buffer", type=int, default=1000, help="readings kept while disconnected (default: %(default)s)")
    parser.add_argument("--period", type=float, default=60.0, help="seconds per cycle of the simulated sine (default: %(default)s)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every reading")
    args = parser.parse_args(argv)
    if args.url_option is not None:
        if args.url is not None:
            parser.error("give the URL once: as the argument or with --url")
        args.url = args.url_option
    if args.url is None:
        args.url = DEFAULT_URL
    url = urllib.parse.urlsplit(args.url)
    if url.scheme not in ("ws", "wss") or not url.hostname:
        parser.error(f"{args.url}: the URL must be ws://HOST[:PORT]/PATH or wss://...")
    if args.token is not None:
        args.token = args.token.strip()
        if not args.token or not all("!" <= c <= "~" for c in args.token):
            parser.error("--token: a token is one line of printable ASCII without spaces")
    if not 0 < args.interval <= MAX_INTERVAL:
        parser.error(f"--interval must be more than 0 and at most {MAX_INTERVAL:g}")
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    if args.buffer < 1:
        parser.error("--buffer must be at least 1")
    if not args.period > 0:
        parser.error("--period must be more than 0")
    if args.file:
        try:
            open(args.file, "rb").close()
        except OSError as e:
            parser.error(f"--file: {e.strerror}: {args.file}")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s pi_sensor: %(message)s", level=logging.WARNING, stream=sys.stderr)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:  # platforms without loop signal handlers
        return 0


if __name__ == "__main__":
    sys.exit(main())
