"""A TCP relay that behaves like a network link of a given speed:

    python bench/slowlink.py PORTFILE UPSTREAM MBPS [LOG]

Listens on a free 127.0.0.1 port (written to PORTFILE once listening) and relays every connection to
UPSTREAM (HOST:PORT), each direction paced to MBPS megabytes a second shared by all connections (a full-duplex
link: uploads and downloads do not slow each other). bench/perf_ab.py --link-mbps puts it between the
builders and the registry: on loopback the upload of a push costs CPU and little time, over a link it
costs time, which is what overlapping upload and compression (and download and unpack) is for.
Runs until killed; its own CPU is not counted in the builders' times (it is not their child). With LOG it
rewrites that file every second with the bytes it relayed in each quarter second ("UNIXTIME UP DOWN" lines):
the timeline of a push or pull (docs/benchmarks.md: when the upload starts against when compression ends).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

COUNTS: dict[float, list[int]] = {}  # quarter second -> [bytes up, bytes down]
COUNTS_LOCK = threading.Lock()


class Link:
    """One direction of the link: senders take turns for `rate` bytes a second."""

    def __init__(self, rate: float, column: int) -> None:
        self.rate = rate
        self.column = column
        self.lock = threading.Lock()
        self.free_at = time.monotonic()

    def pace(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.free_at = max(now, self.free_at) + n / self.rate
            wait = self.free_at - now
        with COUNTS_LOCK:
            COUNTS.setdefault(int(time.time() * 4) / 4, [0, 0])[self.column] += n
        if wait > 0:
            time.sleep(wait)


def write_log(path: str) -> None:
    while True:
        time.sleep(1)
        with COUNTS_LOCK:
            lines = [f"{t:.2f} {up} {down}\n" for t, (up, down) in sorted(COUNTS.items())]
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.rename(path + ".tmp", path)


def pipe(src: socket.socket, dst: socket.socket, link: Link) -> None:
    try:
        while data := src.recv(1 << 16):
            link.pace(len(data))
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def handle(client: socket.socket, upstream: tuple[str, int], up: Link, down: Link) -> None:
    try:
        server = socket.create_connection(upstream)
    except OSError:
        client.close()
        return
    sender = threading.Thread(target=pipe, args=(client, server, up), daemon=True)
    sender.start()
    pipe(server, client, down)
    sender.join()
    client.close()
    server.close()


def main() -> None:
    portfile, upstream, mbps = sys.argv[1], sys.argv[2], float(sys.argv[3])
    host, port = upstream.rsplit(":", 1)
    up, down = Link(mbps * 1e6, 0), Link(mbps * 1e6, 1)
    if len(sys.argv) > 4:
        threading.Thread(target=write_log, args=(sys.argv[4],), daemon=True).start()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(listener.getsockname()[1]))
    os.rename(portfile + ".tmp", portfile)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=handle, args=(client, (host, int(port)), up, down), daemon=True).start()


if __name__ == "__main__":
    main()
