"""Qwen2.5-Math-PRM behind vLLM's pooling endpoint: :class:`ServedPRM`.

The PRM input is built and tokenised here exactly as :class:`~components.prm_qwen.QwenMathPRM` does (chat text,
``<extra_0>`` after every step, the truncation rule); only the forward pass moves to a vLLM server, which gets token
ids. So the scores equal the in-process PRM's up to the server's numerics.

Server side (vLLM registers ``Qwen2ForProcessRewardModel`` as a pooling model with ``STEP`` pooling):
``POST /pooling`` with ``{"input": [[ids…], …], "task": "token_classify", "use_activation": false,
"add_special_tokens": false}`` answers, for every input, the two logits at each token equal to the server's
``step_tag_id`` (set with ``--pooler-config '{"step_tag_id": <id of <extra_0>>}'``; vLLM's default is 151651, the id of
``<extra_0>`` in the Qwen2.5 tokenizer). The step score is ``softmax(logits)[1]``, computed here in float32.

Only HTTP is spoken, so this module imports without vLLM; ``python`` names the interpreter that has vLLM when the PRM
launches its own server.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import socket
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlparse

import torch

from components.prm_common import PRMInput, Truncation
from components.prm_qwen import DEFAULT_SYSTEM_PROMPT, QwenMathPRM
from components.vllm_server import ServerClient, ServerError, ServerProcess, check_reachable
from prpo_lightning.scoring.faults import PRMError

__all__ = ["ServedPRM", "parse_pooling_response"]

log = logging.getLogger(__name__)
SETTING = "model.prm.init_args"


def parse_pooling_response(body: Any, chunk: list[PRMInput], url: str, tag_id: int) -> dict[int, list[float]]:
    """Read P(step correct) per separator from a ``/pooling`` answer (untrusted input: every field is checked).

    Args:
        body: the decoded JSON answer.
        chunk: the inputs of the request, in request order.
        url: the server (for messages).
        tag_id: the separator id the inputs carry (for the fix in messages).

    Returns:
        ``{row: [softmax(logits)[1] per separator]}`` for the rows of ``chunk``.

    Raises:
        PRMError: the answer is not one list of ``[logit_bad, logit_good]`` pairs per separator of every input.
    """
    where = f"ServedPRM: POST {url}/pooling"
    items = body.get("data") if isinstance(body, dict) else None
    if not isinstance(items, list) or len(items) != len(chunk):
        got = f"{len(items)} items" if isinstance(items, list) else repr(body)[:200]
        raise PRMError(f"{where} answered {got} for {len(chunk)} inputs; expected a pooling response with one item "
                       "per input (is the server a vLLM pooling server of a Qwen2ForProcessRewardModel?)")
    by_index: dict[int, Any] = {}
    for item in items:
        index = item.get("index") if isinstance(item, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(chunk) or index in by_index:
            raise PRMError(f"{where} answered an item with a missing, duplicate or out-of-range index: {item!r:.200}")
        by_index[index] = item.get("data")
    out: dict[int, list[float]] = {}
    for k, (row, _, positions) in enumerate(chunk):
        logits = by_index[k]
        if not isinstance(logits, list) or len(logits) != len(positions):
            got = len(logits) if isinstance(logits, list) else type(logits).__name__
            raise PRMError(
                f"{where} answered {got} score rows for an input with {len(positions)} step separators (token id "
                f"{tag_id}). The server must read the logits at the PRM's separator: start it with --pooler-config "
                f"'{{\"step_tag_id\": {tag_id}}}' (ServedPRM does so when it launches the server itself)"
            )
        if not all(isinstance(p, list) and len(p) == 2 and all(_is_finite_number(v) for v in p) for p in logits):
            raise PRMError(f"{where} answered scores that are not pairs of finite numbers (the two logits of "
                           f"Qwen2ForProcessRewardModel) for input {k}: {logits!r:.200}")
        pairs = torch.tensor(logits, dtype=torch.float32).reshape(len(positions), 2)  # (J, 2)
        out[row] = torch.softmax(pairs, dim=-1)[:, 1].tolist()
    return out


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ServedPRM(QwenMathPRM):
    """:class:`~components.prm_qwen.QwenMathPRM` whose forward pass runs on vLLM servers (launched or running).

    **Launch** (default, no ``urls``): :meth:`setup` starts ``python -m vllm.entrypoints.openai.api_server --model
    <model_name_or_path> --runner pooling --pooler-config '{"step_tag_id": <id>}' …`` as a child process in its own
    process group and waits for ``/health``; the server stops at :meth:`teardown`, at interpreter exit, when the PRM is
    collected and, on Linux, when the trainer dies (``PR_SET_PDEATHSIG``): no orphan server. Under DDP
    (``torch.distributed`` initialised) with ``share_server`` the ranks of one machine share one server: rank 0
    launches it and sends its URL to the others.

    **Connect** (``urls: [...]``): the servers must answer ``/health`` at :meth:`setup`, before any model work, or
    the error names the URL and the command that starts such a server. Requests go round-robin over the URLs.

    **Scoring**: inputs are tokenised locally (identical to ``QwenMathPRM``), grouped ``micro_batch_size`` per request
    and sent with up to ``max_concurrency`` requests in flight. Every request has a time limit
    (``request_timeout_s``); connection failures are retried ``retries`` times; then, or on any error answer, the
    call raises :class:`~prpo_lightning.scoring.faults.PRMError`, which ``model.on_prm_error`` turns into a stop
    (``raise``) or a skipped batch (``skip``). A launched server that has died fails the call at once, with its log.

    The arguments of :class:`~components.prm_qwen.QwenMathPRM` keep their meaning (``micro_batch_size``: inputs per
    request); the others:

    Args:
        launch: start a server (default: when no ``urls`` are given).
        urls: ``http://host:port`` of running servers to connect to (then ``launch`` must not be true).
        python: the interpreter with vLLM for launching (default: this one).
        host: interface a launched server listens on.
        port: its port (default: a free one).
        gpu_memory_utilization: ``--gpu-memory-utilization`` of a launched server (on CPU: a fraction of RAM).
        kv_cache_memory_gib: ``--kv-cache-memory-bytes`` in GiB instead (recommended on CPU, e.g. 0.5).
        enforce_eager: pass ``--enforce-eager`` (faster start, slower scoring).
        server_args: further arguments of a launched server (e.g. ``["--tensor-parallel-size", "2"]``).
        env: extra environment of a launched server (e.g. ``{"CUDA_VISIBLE_DEVICES": "1"}``).
        startup_timeout_s: time limit for a launched server to answer ``/health``.
        request_timeout_s: time limit of one request.
        retries: extra attempts of a request after a connection failure.
        retry_wait_s: wait before each retry.
        max_concurrency: requests in flight at once.
        share_server: under DDP, the ranks of a machine share rank 0's launched server.
    """

    def __init__(
        self,
        model_name_or_path: str = "Qwen/Qwen2.5-Math-PRM-7B",
        tokenizer_name_or_path: str | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        separator: str = "<extra_0>",
        max_length: int = 4096,
        micro_batch_size: int = 8,
        dtype: str = "bfloat16",
        truncation: Truncation = "carry_forward",
        skip_special_tokens: bool = True,
        launch: bool | None = None,
        urls: list[str] | None = None,
        python: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_gib: float | None = None,
        enforce_eager: bool = False,
        server_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 900.0,
        request_timeout_s: float = 300.0,
        retries: int = 2,
        retry_wait_s: float = 2.0,
        max_concurrency: int = 4,
        share_server: bool = True,
    ) -> None:
        super().__init__(model_name_or_path, tokenizer_name_or_path, system_prompt, separator, max_length,
                         micro_batch_size, dtype, truncation, skip_special_tokens)
        urls = list(urls or [])
        if launch and urls:
            raise ValueError(f"ServedPRM: {SETTING}.launch is true and {SETTING}.urls is set ({urls}): set launch: "
                             "false (or leave it out) to connect to the urls, or drop urls to launch a server")
        if launch is False and not urls:
            raise ValueError(f"ServedPRM: {SETTING}.launch is false and no {SETTING}.urls are given: name the running "
                             "servers in urls (e.g. [http://127.0.0.1:8000]) or set launch: true")
        for i, url in enumerate(urls):
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"ServedPRM: {SETTING}.urls[{i}] {url!r} is not an http(s)://host:port URL")
        for name, value in (("startup_timeout_s", startup_timeout_s), ("request_timeout_s", request_timeout_s),
                            ("max_concurrency", max_concurrency)):
            if not value > 0:
                raise ValueError(f"ServedPRM: {SETTING}.{name} must be > 0, got {value}")
        if retries < 0 or retry_wait_s < 0:
            raise ValueError(f"ServedPRM: {SETTING}.retries and retry_wait_s must be >= 0, got {retries}, {retry_wait_s}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"ServedPRM: {SETTING}.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.launch = not urls
        self.urls = [u.rstrip("/") for u in urls]
        self.python = python
        self.host = host
        self.port = port
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_memory_gib = kv_cache_memory_gib
        self.enforce_eager = enforce_eager
        self.server_args = list(server_args or [])
        self.env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self.max_concurrency = max_concurrency
        self.share_server = share_server
        self.server: ServerProcess | None = None
        self.clients: list[ServerClient] = []
        self.last_request_s = 0.0

    # ----------------------------------------------------------------- server
    def server_arguments(self) -> list[str]:
        """Arguments of a launched server after ``--model/--host/--port`` (needs the tokenizer, for the tag id)."""
        args = ["--runner", "pooling", "--dtype", self.dtype, "--max-model-len", str(self.max_length),
                "--pooler-config", json.dumps({"step_tag_id": self.tag_id}),
                "--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.kv_cache_memory_gib is not None:
            args += ["--kv-cache-memory-bytes", str(int(self.kv_cache_memory_gib * (1 << 30)))]
        if self.enforce_eager:
            args.append("--enforce-eager")
        return args + self.server_args

    def _process(self, host: str | None = None, port: int | None = None) -> ServerProcess:
        from prpo_lightning.runtime.models import resolve_model_path

        return ServerProcess(resolve_model_path(self.model_name_or_path), self.server_arguments(), python=self.python,
                             host=host or self.host, port=port if port is not None else self.port, env=self.env,
                             startup_timeout_s=self.startup_timeout_s, name="ServedPRM")

    def launch_command(self, url: str | None = None) -> str:
        """The shell command that starts a server this PRM can use (at ``url``'s host and port, if given)."""
        parsed = urlparse(url) if url else None
        process = self._process(parsed.hostname if parsed else None, parsed.port if parsed else 8000)
        return shlex.join(process.command())

    def setup(self, device: torch.device | str = "cpu") -> None:
        """Reach the servers (connect: check ``/health`` first), load the tokenizer, launch if asked; once.

        Raises:
            ServerError: a server is unreachable, did not start, or is not a PRM pooling server of this tokenizer.
        """
        from prpo_lightning.runtime.models import resolve_model_path

        self.device = torch.device(device)
        if self.clients:
            return
        if not self.launch:
            for i, url in enumerate(self.urls):  # before any model work
                check_reachable(url, f"ServedPRM ({SETTING}.urls[{i}])", self._connect_hint(url),
                                timeout_s=min(10.0, self.request_timeout_s))
        if self.tokenizer is None:
            self.tokenizer = self.load_tokenizer(resolve_model_path(self.tokenizer_name_or_path))
        urls = self._launch_or_share() if self.launch else self.urls
        self.clients = [ServerClient(u, self.request_timeout_s, self.retries, self.retry_wait_s) for u in urls]
        try:
            for i, client in enumerate(self.clients):
                self._check_server(client, i)
        except BaseException:
            self.teardown()
            raise

    def _connect_hint(self, url: str) -> str:
        """The launch command for ``url``, with the separator id when the tokenizer is loaded already."""
        if self.tokenizer is not None:
            return self.launch_command(url)
        parsed = urlparse(url)
        return (f"python -m vllm.entrypoints.openai.api_server --model {self.model_name_or_path} --host "
                f"{parsed.hostname} --port {parsed.port or 80} --runner pooling --dtype {self.dtype} --max-model-len "
                f"{self.max_length} --pooler-config '{{\"step_tag_id\": <id of {self.separator} in the PRM tokenizer>}}'")

    def _launch_or_share(self) -> list[str]:
        """Launch this process's server, or (DDP, ``share_server``) rank 0's, whose URL every rank receives."""
        dist = torch.distributed
        if not (self.share_server and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return [self._launch()]
        hosts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
        if len(set(hosts)) > 1:
            raise ServerError(f"ServedPRM: {SETTING}.share_server is true but the ranks run on {len(set(hosts))} "
                              "machines; set share_server: false (one server per rank), or start servers yourself "
                              f"and list them in {SETTING}.urls")
        message: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                message = [("url", self._launch())]
            except Exception as err:  # noqa: BLE001 - sent to every rank, then raised everywhere
                message = [("error", str(err))]
        dist.broadcast_object_list(message, src=0)  # rank 0's launch is bounded by startup_timeout_s: no hang
        kind, value = message[0]
        if kind == "error":
            raise ServerError(value if dist.get_rank() == 0 else f"ServedPRM: rank 0 could not launch the shared PRM "
                              f"server: {value}")
        return [value]

    def _launch(self) -> str:
        self.server = self._process().start()
        log.info("ServedPRM: launched %s (pid %d, log %s)", shlex.join(self.server.command()), self.server.process.pid,
                 self.server.log_path)
        try:
            self.server.wait_healthy()
        except ServerError as err:  # the message names the engine's setting; this is the PRM's
            self.server.stop()
            raise ServerError(str(err).replace("model.engine.startup_timeout_s", f"{SETTING}.startup_timeout_s")) \
                from err
        except BaseException:
            self.server.stop()
            raise
        return self.server.url

    def _check_server(self, client: ServerClient, i: int) -> None:
        """The server must take ``max_length``-token inputs and read the logits at this tokenizer's separator."""
        where = "the launched PRM server" if self.launch else f"{SETTING}.urls[{i}]"
        models = client.get("/v1/models", timeout_s=min(30.0, self.request_timeout_s))
        served = models.get("data") if isinstance(models, dict) else None
        limit = served[0].get("max_model_len") if isinstance(served, list) and served and isinstance(served[0], dict) \
            else None
        if isinstance(limit, int) and limit < self.max_length:
            raise ServerError(f"ServedPRM: {where} {client.url} takes at most {limit} tokens, but {SETTING}.max_length "
                              f"is {self.max_length}: lower max_length to {limit} or restart the server with "
                              f"--max-model-len {self.max_length}")
        probe: list[PRMInput] = [(0, [self.tag_id], [0])]
        try:
            parse_pooling_response(client.post("/pooling", self._request_body(probe)), probe, client.url, self.tag_id)
        except PRMError as err:
            raise ServerError(f"ServedPRM: {where} {client.url} is not a PRM pooling server for this tokenizer: {err}. "
                              f"Start one with: {self.launch_command(client.url)}") from err

    def teardown(self) -> None:
        """Stop the launched server (if any) and forget the connections; a later :meth:`setup` starts again."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.clients = []

    # ----------------------------------------------------------------- scoring
    @staticmethod
    def _request_body(chunk: list[PRMInput]) -> dict[str, Any]:
        return {"input": [ids for _, ids, _ in chunk], "task": "token_classify", "use_activation": False,
                "add_special_tokens": False}

    def _post(self, client: ServerClient, chunk: list[PRMInput]) -> dict[int, list[float]]:
        return parse_pooling_response(client.post("/pooling", self._request_body(chunk)), chunk, client.url,
                                      self.tag_id)

    def read_step_probs(self, inputs: list[PRMInput]) -> dict[int, list[float]]:
        """Score ``inputs`` on the servers: ``micro_batch_size`` inputs per request, ``max_concurrency`` in flight.

        Raises:
            PRMError: a launched server has exited, a request failed after its retries or answered an error, or the
                whole call outlived its time limit.
        """
        if not self.clients:
            self.setup(self.device)
        if not inputs:
            return {}
        if self.server is not None and not self.server.alive:
            raise PRMError(f"ServedPRM: the PRM server launched at {self.server.url} has exited with code "
                           f"{self.server.process.poll() if self.server.process else None}.\nCommand: "
                           f"{shlex.join(self.server.command())}\nLast lines of {self.server.log_path}:\n"
                           f"{self.server.log_tail()}")
        order = sorted(inputs, key=lambda x: len(x[1]))
        chunks = [order[k : k + self.micro_batch_size] for k in range(0, len(order), self.micro_batch_size)]
        # every request ends within its retries' time limits and waits; the margin covers the thread start-up
        per_request = (self.retries + 1) * self.request_timeout_s + self.retries * self.retry_wait_s
        limit = per_request * math.ceil(len(chunks) / self.max_concurrency) + 10.0
        start = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(chunks)), thread_name_prefix="served-prm")
        try:
            futures = [pool.submit(self._post, self.clients[k % len(self.clients)], chunk)
                       for k, chunk in enumerate(chunks)]
            done, pending = wait(futures, timeout=limit, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                err = failed.exception()
                if isinstance(err, PRMError):
                    raise err
                raise PRMError(f"ServedPRM: scoring {len(inputs)} inputs failed: {err}") from err
            if pending:
                raise PRMError(f"ServedPRM: scoring {len(inputs)} inputs in {len(chunks)} requests did not finish "
                               f"within {limit:g} s ({SETTING}.request_timeout_s {self.request_timeout_s:g}, retries "
                               f"{self.retries})")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        read: dict[int, list[float]] = {}
        for future in futures:
            read.update(future.result())
        self.last_request_s = time.monotonic() - start
        return read

    def score_texts(self, problems: list[str], steps: list[list[str]]) -> list[list[float]]:
        """As :meth:`QwenMathPRM.score_texts`, on the servers; also records ``request_s`` for :meth:`batch_metrics`."""
        self.last_request_s = 0.0
        out = super().score_texts(problems, steps)
        self.last_stats["request_s"] = float(self.last_request_s)
        return out
