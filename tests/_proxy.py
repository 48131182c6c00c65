"""Test helper: a TCP proxy on 127.0.0.1 that makes a loopback server behave like a network.

It adds a delay to every byte in each direction (half the round trip each way, without
limiting throughput: bytes are queued with the time they are due), caps the bandwidth of
server-to-client bytes (one token bucket for all connections), and can reset connections:
``reset_after`` bytes into a response, a connection is closed abruptly (RST), once per
``reset_every`` connections. Used by the fault tests and ``benchmarks/remote.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass


@dataclass
class Network:
    """What the proxy does to the traffic; change it while the proxy runs."""

    rtt_s: float = 0.0
    """Round trip added (half each way)."""
    bandwidth: float | None = None
    """Bytes per second from the server to clients, all connections together (None: no cap)."""
    reset_every: int = 0
    """Reset one connection in this many (0: never)."""
    reset_after: int = 0
    """Bytes of the response sent before a reset."""
    stall: bool = False
    """Stop forwarding responses (a server that hangs)."""


class Proxy:
    """Forward 127.0.0.1:``port`` to ``127.0.0.1:target`` through a :class:`Network`."""

    def __init__(self, target: int, network: Network | None = None) -> None:
        self.target = target
        self.network = network or Network()
        self.connections = 0
        self.open = 0  # connections open now
        self.peak_open = 0  # the most open at once
        self.bytes_down = 0
        self.requests = 0  # HTTP requests seen (GET and HEAD lines from clients)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._bucket_time = time.monotonic()
        self._bucket = 0.0
        self._writers: set[asyncio.StreamWriter] = set()
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        """Stop serving; close every connection."""

        async def shutdown() -> None:
            self._server.close()
            for writer in list(self._writers):
                _abort(writer)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(10)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        net = self.network
        reset = net.reset_every > 0 and self.connections % net.reset_every == 0
        self._writers.add(writer)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            _abort(writer)
            self._writers.discard(writer)
            self.open -= 1
            return
        self._writers.add(up_w)
        try:
            await asyncio.gather(
                self._pipe(reader, up_w, down=False, reset=False, client=writer),
                self._pipe(up_r, writer, down=True, reset=reset, client=writer),
                return_exceptions=True,
            )
        finally:
            self.open -= 1
            for w in (writer, up_w):
                self._writers.discard(w)
                _abort(w)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        *,
        down: bool,
        reset: bool,
        client: asyncio.StreamWriter,
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            sent = 0
            while True:
                due, data = await queue.get()
                if not data:
                    break
                while self.network.stall and down:
                    await asyncio.sleep(0.05)
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if down:
                    await self._take(len(data))
                    self.bytes_down += len(data)
                if reset and down and sent + len(data) > self.network.reset_after:
                    _abort(client)
                    return
                dst.write(data)
                await dst.drain()
                sent += len(data)
            if dst.can_write_eof():
                dst.write_eof()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                data = await src.read(65536)
                if not down:
                    self.requests += data.count(b"GET /") + data.count(b"HEAD /")
                queue.put_nowait((time.monotonic() + self.network.rtt_s / 2, data))
                if not data:
                    break
        finally:
            queue.put_nowait((0.0, b""))
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await sender

    async def _take(self, n: int) -> None:
        """Wait until the bandwidth cap lets ``n`` more bytes through."""
        cap = self.network.bandwidth
        if not cap:
            return
        while True:
            now = time.monotonic()
            self._bucket = min(cap * 0.05, self._bucket + (now - self._bucket_time) * cap)
            self._bucket_time = now
            if self._bucket >= min(n, cap * 0.05):
                self._bucket -= n
                return
            await asyncio.sleep(max(0.001, (n - self._bucket) / cap))


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP reset (nothing if it is closed already)."""
    if writer.transport.is_closing():
        writer.close()
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    writer.close()
