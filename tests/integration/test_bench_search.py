"""``lodestar bench search``'s load generator over loopback: closed-loop clients against a real
HTTP server, and the CPU time per request it reports for the processes it is given."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lodestar.bench.search import closed_loop, cpu_seconds


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the bench's clients expect

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        sum(i * i for i in range(20000))  # some CPU in this process per request
        answer = json.dumps({"echo": json.loads(body)}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


def test_cpu_seconds_counts_this_process() -> None:
    before = cpu_seconds(os.getpid())
    sum(i * i for i in range(2_000_000))
    assert cpu_seconds(os.getpid()) > before


def test_closed_loop_reports_latencies_and_cpu_per_request() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:

        async def send(http: Any, query: str) -> Any:
            return await http.post("/search", json={"query": query})

        url = f"http://127.0.0.1:{server.server_address[1]}"
        row = asyncio.run(closed_loop(send, url, ["a", "b"], 2, 1.0, 0.2, {"server": os.getpid()}))
    finally:
        server.shutdown()
    assert row["clients"] == 2 and row["errors"] == 0 and row["requests"] > 0
    assert 0 < row["p50"] <= row["p95"] <= row["p99"]
    cpu = row["cpu_ms_per_request"]
    assert set(cpu) == {"server", "load generator"}
    # The server runs in this process, so both figures are this process's CPU time over the
    # window: /proc counts it in 10 ms ticks, time.process_time() exactly.
    assert cpu["server"] > 0 and cpu["load generator"] > 0
    assert abs(cpu["server"] - cpu["load generator"]) * row["requests"] <= 30
