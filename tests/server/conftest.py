"""Live `infercept serve` processes for the server tests.

`ServerProcess` runs `infercept serve` (the console script, as a user would)
as a child process, logs to a file, waits for `/health`, and on stop sends
SIGINT, then SIGKILL after a timeout. A session keeps at most one server alive
(`ServerPool`): the next request for the same arguments reuses it, other
arguments stop it first, so the two shared cores never start two engines.

Fixtures:
  start_server(model, *extra_args) -> ServerProcess   any server; model None = embedded default
  tiny_server                                          the tiny model with TINY_SERVER_ARGS
  base_url, client                                     tiny_server's URL and an openai.OpenAI client
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import httpx
import pytest

INFERCEPT_BIN = Path(sys.executable).with_name("infercept")
HOST = "127.0.0.1"
# Bounds on a hang, not timings: a server start (an engine, on two shared cores) and
# its exit on SIGINT take seconds to a minute or two on a busy machine. A test that
# does hang is stopped by pytest-timeout (900 s) anyway.
STARTUP_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0
LOG_TAIL_LINES = 60

TINY_KV_CACHE = "64M"  # vLLM's human_readable_int: M = MiB, K = KiB; no "MiB" spelling
TINY_SERVER_ARGS = (
    "--max-model-len", "2048",
    "--kv-cache-memory-bytes", TINY_KV_CACHE,
    "--block-size", "32",
    "--dtype", "float32",
    "--enforce-eager",
    "--tool-call-parser", "hermes",
    "--enable-auto-tool-choice",
    "--intercept-policy", "preserve",
)  # fmt: skip


def server_env(multiprocessing: bool = False) -> dict[str, str]:
    """The child's environment: two OpenMP threads, offline hub, quiet tokenizers.

    Without multiprocessing (the default here) vLLM's CPU platform keeps the
    model worker inside the engine-core process (two processes instead of
    three); the API server runs the engine core in a child either way.
    """
    env = dict(os.environ)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
    env["OMP_NUM_THREADS"] = "2"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("VLLM_LOGGING_LEVEL", None)  # the log file wants vLLM's INFO lines
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One `infercept serve` child process, its log file and its HTTP address."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.command = [str(INFERCEPT_BIN), "serve", *args, "--host", HOST, "--port", str(self.port)]
        self.log_path = Path(log_path)
        self.env = server_env() if env is None else env
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> "ServerProcess":
        """Start the process and return once GET /health answers 200."""
        if not INFERCEPT_BIN.exists():
            pytest.fail(f"{INFERCEPT_BIN} not found: pip install -e . into this environment")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # a Ctrl-C at the terminal reaches pytest only
            )
        try:
            self._wait_healthy(startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s:
            exit_code = self.process.poll()
            if exit_code is not None:
                pytest.fail(f"server exited with {exit_code} before it was healthy\n{self.describe()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pytest.fail(f"server not healthy after {timeout_s:.0f} s\n{self.describe()}")

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> tuple[int, bool]:
        """SIGINT, then SIGKILL after `timeout_s`; returns (exit code, whether it was killed).

        Processes left in the server's session (its engine core) are killed too.
        """
        if self.process is None:
            raise RuntimeError("server was never started")
        killed = False
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
                killed = True
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the session we started; usually empty now
        except (ProcessLookupError, PermissionError):
            pass
        return self.process.returncode, killed

    def log_tail(self, num_lines: int = LOG_TAIL_LINES) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])

    def describe(self) -> str:
        return f"command: {' '.join(self.command)}\nlog {self.log_path}, last lines:\n{self.log_tail()}"

    def client(self):
        import openai

        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key="EMPTY", timeout=REQUEST_TIMEOUT_S, max_retries=0
        )


class ServerPool:
    """At most one live server per session, reused while its arguments stay the same."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.server: ServerProcess | None = None
        self.key: tuple | None = None
        self.num_started = 0

    def get(
        self,
        model: str | Path | None,
        extra_args: Sequence[str],
        *,
        multiprocessing: bool = False,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        env: dict[str, str] | None = None,
    ) -> ServerProcess:
        """The live server for these arguments, started (and the previous one stopped) if need be.

        `env`: variables set in the server's environment, over `server_env`'s."""
        args = ([] if model is None else [str(model)]) + [str(arg) for arg in extra_args]
        key = (tuple(args), multiprocessing, tuple(sorted((env or {}).items())))
        if self.key == key and self.server.is_running():
            return self.server
        self.close()
        self.num_started += 1
        log_path = self.log_dir / f"server-{self.num_started}.log"
        server = ServerProcess(args, log_path, env={**server_env(multiprocessing), **(env or {})})
        server.start(startup_timeout_s)
        self.server, self.key = server, key
        return server

    def take(self) -> ServerProcess:
        """The live server, forgotten by the pool: the caller stops it (a shutdown test)."""
        server, self.server, self.key = self.server, None, None
        assert server is not None, "no live server to take"
        return server

    def close(self) -> None:
        """Stop the live server; fail unless it was still up and exited 0 on SIGINT."""
        server, self.server, self.key = self.server, None, None
        if server is None:
            return
        was_running = server.is_running()
        exit_code, killed = server.stop()
        assert was_running, f"server died while in use (exit {exit_code})\n{server.describe()}"
        assert not killed, f"server ignored SIGINT for {STOP_TIMEOUT_S:.0f} s\n{server.describe()}"
        assert exit_code == 0, f"server exited with {exit_code} on SIGINT\n{server.describe()}"


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("server-logs"))
    yield pool
    pool.close()


@pytest.fixture
def start_server(server_pool):
    """`start_server(model, *extra_args, multiprocessing=False, startup_timeout_s=...)` -> ServerProcess.

    `model` None serves the embedded default model. The server outlives the
    test and is reused by the next test that asks for the same arguments.
    """

    def start(model, *extra_args, **options) -> ServerProcess:
        return server_pool.get(model, extra_args, **options)

    return start


@pytest.fixture
def tiny_server(start_server, tiny_model) -> ServerProcess:
    return start_server(tiny_model, *TINY_SERVER_ARGS)


@pytest.fixture
def base_url(tiny_server) -> str:
    return tiny_server.base_url


@pytest.fixture
def client(tiny_server):
    return tiny_server.client()
