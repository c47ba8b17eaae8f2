"""The served engine's client side without vLLM: answers read as untrusted input, what is retried and what is not,
no proxy for local servers, settings refused up front, the self-check's compute dtype.

The end-to-end tests with real vLLM servers are in ``tests/test_engines_vllm_server.py`` (vLLM environment).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from components.engines import VLLMServerEngine
from components.vllm_server import (
    ServerClient, ServerError, ServerProcess, ServerUnreachableError, free_port, read_generate_answer,
)
from prpo_lightning.rollout.collector import RolloutCollector
from prpo_lightning.rollout.engine import StaleWeightsError


def choice(index: int, tokens: list[int], version: str = "3", logprob: float = -0.5) -> dict:
    return {"index": index, "token_ids": tokens, "weight_versions": [{"version": version, "start": 0, "end": 1}],
            "logprobs": {"content": [{"token_id": t, "logprob": logprob} for t in tokens]}}


def test_a_good_answer_is_read_in_choice_order():
    answer = {"choices": [choice(1, [7, 8]), choice(0, [5])]}
    assert read_generate_answer(answer, 2, "3", 10, 4) == [([5], [-0.5]), ([7, 8], [-0.5, -0.5])]


@pytest.mark.parametrize(("answer", "error", "match"), [
    ({"choices": [choice(0, [5])]}, ValueError, "1 choices, expected 2"),
    ("not json object", ValueError, "no choices"),
    ({"choices": [choice(0, [5]), choice(0, [6])]}, ValueError, "choice indices"),
    ({"choices": [choice(0, [5]), {**choice(1, [6]), "weight_versions": None}]}, ValueError, "no weight_versions"),
    ({"choices": [choice(0, [5]), choice(1, [6], version="2")]}, StaleWeightsError, r"version\(s\) \['2'\]"),
    ({"choices": [choice(0, [5]), choice(1, [10])]}, ValueError, r"ids in \[10, 10\] \(vocabulary 10\)"),
    ({"choices": [choice(0, [5]), choice(1, [-1])]}, ValueError, "ids in"),
    ({"choices": [choice(0, [5]), choice(1, [1, 2, 3, 4, 5])]}, ValueError, r"5 tokens \(at most 4\)"),
    ({"choices": [choice(0, [5]), {**choice(1, [6]), "logprobs": None}]}, ValueError, "no log-probs"),
    ({"choices": [choice(0, [5]), choice(1, [6], logprob=0.7)]}, ValueError, "not finite numbers <= 0"),
    ({"choices": [choice(0, [5]), choice(1, [6], logprob=float("nan"))]}, ValueError, "not finite"),
    ({"choices": [choice(0, [5]), {**choice(1, [6]), "token_ids": ["6"]}]}, ValueError, "not a list of integers"),
])
def test_malformed_or_stale_answers_are_refused_by_name(answer, error, match):
    with pytest.raises(error, match=match):
        read_generate_answer(answer, 2, "3", 10, 4)


class _Handler(http.server.BaseHTTPRequestHandler):
    hits = 0
    delay = 0.0

    def do_POST(self):  # noqa: N802 - http.server's name
        type(self).hits += 1
        time.sleep(type(self).delay)
        body = json.dumps({"ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def local_server():
    _Handler.hits, _Handler.delay = 0, 0.0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_local_servers_are_reached_without_the_users_proxy(local_server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a proxy that does not exist
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert ServerClient(local_server, timeout_s=10).post("/x") == {"ok": True}


def test_a_timed_out_request_is_not_sent_twice(local_server):
    _Handler.delay = 1.5
    client = ServerClient(local_server, timeout_s=0.3, retries=3, retry_wait_s=0.0)
    with pytest.raises(ServerUnreachableError, match="not retried"):
        client.post("/reload")
    time.sleep(1.6)
    assert _Handler.hits == 1  # the server may still be working on it: one request only


def test_a_refused_connection_is_retried_then_named():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachableError, match="failed 3 time"):
        ServerClient(url, timeout_s=2, retries=2, retry_wait_s=0.0).post("/x")


def test_servers_are_started_from_the_main_thread_only(tmp_path):
    errors = []
    server = ServerProcess(str(tmp_path), python="/bin/true")
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, server.start)))
    thread.start()
    thread.join(10)
    assert errors and "main thread only" in str(errors[0].value)


def test_engine_settings_are_refused_up_front():
    with pytest.raises(ValueError, match="give model.engine.urls"):
        VLLMServerEngine(launch=False)
    with pytest.raises(ValueError, match=r"devices entry '4,5,6' names 3 GPU\(s\) but tensor_parallel_size is 2"):
        VLLMServerEngine(devices=["4,5,6"], tensor_parallel_size=2)
    with pytest.raises(ValueError, match="model.engine.weight_transfer must be one of"):
        VLLMServerEngine(weight_transfer="ftp")
    with pytest.raises(ServerError, match=r"(?s)model.engine.urls.*no vLLM server answers"):
        VLLMServerEngine(urls=[f"http://127.0.0.1:{free_port()}"]).check_sampling(
            SimpleNamespace(max_prompt_length=8, max_new_tokens=8))


def test_the_self_check_uses_the_compute_dtype_under_autocast():
    """``bf16-mixed`` keeps float32 parameters but computes the log-probs in bfloat16: the bfloat16 threshold applies."""
    holder = SimpleNamespace(policy=torch.nn.Linear(2, 2))
    assert RolloutCollector._compute_dtype(holder) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert RolloutCollector._compute_dtype(holder) == torch.bfloat16
