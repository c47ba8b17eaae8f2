"""A stand-in for vLLM's pooling server of a Qwen2ForProcessRewardModel (tests of ServedPRM without vLLM).

``GET /health``, ``GET /v1/models`` and ``POST /pooling`` as vLLM answers them: for every input, the two logits
``[0, fake_logit(ids, j)]`` at each token equal to ``step_tag_id``. Runs in a thread (:class:`FakePRMServer`) or as a
process launched in place of ``python -m vllm.entrypoints.openai.api_server`` (``main``, through :func:`fake_python`).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def fake_logit(ids: list[int], position: int) -> float:
    """The fake PRM's "step correct" logit at ``position``: depends on the whole prefix, in [-5/3, 5/3]."""
    return ((sum(ids[: position + 1]) % 11) - 5) / 3.0


class FakePRMServer:
    """The fake server in a daemon thread.

    Attributes:
        mode: ``ok``, ``slow`` (sleeps ``delay_s`` per request), ``error`` (HTTP 500), ``wrong_rows`` (one row too
            many), ``nan`` (a NaN logit), ``garbage`` (not a pooling response).
        requests: the decoded bodies of the ``/pooling`` requests received.
        max_in_flight: the most ``/pooling`` requests handled at once.
    """

    def __init__(self, step_tag_id: int, max_model_len: int = 512, mode: str = "ok", delay_s: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.step_tag_id = step_tag_id
        self.max_model_len = max_model_len
        self.mode = mode
        self.delay_s = delay_s
        self.requests: list[dict[str, Any]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakePRMServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def pooling(self, body: dict[str, Any]) -> tuple[int, Any]:
        with self.lock:
            self.requests.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.mode == "error":
                return 500, {"error": {"message": "engine dead", "code": 500}}
            if self.mode == "garbage":
                return 200, ["not", "a", "pooling", "response"]
            data = []
            for k, ids in enumerate(body["input"]):
                rows = [[0.0, fake_logit(ids, j)] for j, t in enumerate(ids) if t == self.step_tag_id]
                if self.mode == "wrong_rows":
                    rows.append([0.0, 0.0])
                if self.mode == "nan" and rows:
                    rows[0][1] = float("nan")
                data.append({"index": k, "object": "pooling", "data": rows})
            return 200, {"object": "list", "model": "fake", "data": data}
        finally:
            with self.lock:
                self.in_flight -= 1


def _handler(server: FakePRMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, body: Any) -> None:
            raw = json.dumps(body, allow_nan=True).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._send(200, {})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "fake", "max_model_len": server.max_model_len}]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/pooling":
                self._send(404, {"error": "not found"})
                return
            self._send(*server.pooling(body))

    return Handler


def main(argv: list[str]) -> None:
    """Serve like ``vllm.entrypoints.openai.api_server`` would, from its arguments (others are ignored)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--pooler-config", default='{"step_tag_id": 151651}')
    args, _ = parser.parse_known_args(argv)
    print("fake PRM server argv:", json.dumps(argv), flush=True)
    server = FakePRMServer(json.loads(args.pooler_config)["step_tag_id"], args.max_model_len,
                           os.environ.get("FAKE_PRM_MODE", "ok"), host=args.host, port=args.port)
    server.httpd.serve_forever()


def fake_python(folder: Path) -> str:
    """An executable that takes ``-m vllm.entrypoints.openai.api_server ARGS`` and runs the fake server instead."""
    path = folder / "fake-python"
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                    "import fake_prm_server\nfake_prm_server.main(sys.argv[3:])\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)
