"""Private broker servers for the chaos tests, one class per broker, each started on a
free loopback port in a directory of its own, killed -9 and restarted in place on the
same port and the same data: PostgreSQL (a cluster made by ``initdb``), NATS with
JetStream (a ``nats-server -js`` store directory) and RabbitMQ (a node of its own:
node name, ports, database and log directories). The shared services are never touched.

Each server is started in a session (process group) of its own, and ``kill`` sends
SIGKILL to that whole group: the server and every process it forked (PostgreSQL's
backends, Erlang's port helpers) die at once, as in a crash of the machine's broker
process tree, with no shutdown step. What survives is what the server had written to
its files: the page cache is kept (the machine does not crash), so this tests the
broker's own recovery, not its fsync policy.

Each ``require_*`` function skips with the reason when the binary is missing, and fails
under CI=true (``.ci/run`` installs them)."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from chaos_harness import free_port, tail

START_TIMEOUT = 90.0  # seconds: generous, the machine may be loaded (a RabbitMQ node takes ~7 s idle)


def missing(what: str, install: str) -> None:
    """Skip naming the missing binary and how to install it; under CI=true, fail."""
    message = f"{what} is not installed ({install}); the chaos tests start their own"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI=true: a missing binary is a failure, not a skip)")
    pytest.skip(message)


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


class PrivateServer:
    """A server process in a session of its own: ``launch`` it, ``kill`` -9 its whole
    process group, ``restart`` it on the same port and data, ``stop`` it gracefully.

    Subclasses give the command (``command``), the signal of a graceful stop and the
    readiness check (``is_ready``, polled while the process lives)."""

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.log = directory / f"{self.name}.out"
        self.start_seconds: list[float] = []  # how long each start took, for the report

    @property
    def url(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def user(self) -> str | None:
        """The user to run as (None: this process's)."""
        return None

    def is_ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        """Start on a fresh free port (retrying if another process took it meanwhile)."""
        for _ in range(5):
            self.port = free_port()
            if self.launch():
                return
        raise RuntimeError(f"{self.name} did not start; its output:\n{tail(self.log)}")

    def restart(self) -> None:
        """Start again on the same port and data (after ``kill``)."""
        if not self.launch():
            raise RuntimeError(f"{self.name} did not restart on {self.port}; its output:\n{tail(self.log)}")

    def launch(self) -> bool:
        started = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                env=self.environment(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() takes every child too
                user=self.user(),
                cwd=self.dir,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # the port was taken, say
                self.proc = None
                return False
            if self.is_ready():
                self.start_seconds.append(round(time.monotonic() - started, 1))
                return True
            time.sleep(0.05)
        self.kill_group()
        return False

    def kill_group(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL to the server's whole process group: no shutdown, no final flush."""
        self.kill_group()
        self.kills += 1

    def stop(self) -> None:
        """A graceful stop by pid (the whole group killed if it takes over 30 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        if self.proc is not None:
            # Helpers of the group (Erlang's epmd is not one: it is started detached)
            # may outlive a server that exited.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.proc = None


# -- PostgreSQL -------------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout), or the one on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path and shutil.which("initdb") else None


def require_postgres() -> Path:
    found = postgres_bin()
    if found is None:
        missing("PostgreSQL's server (initdb, postgres)", "apt-get install postgresql")
    assert found is not None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, and PostgreSQL refuses root: a 'postgres' user is needed to run it as")
    return found


class PostgresServer(PrivateServer):
    """A PostgreSQL cluster of the test's own (``initdb`` into a fresh directory, trust
    authentication, superuser ``postgres``), on 127.0.0.1 only.

    PostgreSQL refuses to run as root: as root it runs as the ``postgres`` user, in a
    directory of ``tempfile.mkdtemp`` handed to that user (pytest's own temporary
    directories are private to root). Killed -9 (every backend too), it restarts with
    crash recovery from its write-ahead log: a committed transaction is never lost."""

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: ends the sessions, then a checkpoint

    def __init__(self, directory: Path, bindir: Path) -> None:
        # The cluster lives in a directory the server's user can reach; ``directory``
        # keeps only what the test reads.
        self.home = Path(tempfile.mkdtemp(prefix="lifecycle-chaos-pg-"))
        super().__init__(self.home)
        self.bindir = bindir
        self.data = self.home / "data"
        as_root = os.geteuid() == 0
        self.run_as = "postgres" if as_root else None
        if as_root:
            account = pwd.getpwnam("postgres")
            os.chown(self.home, account.pw_uid, account.pw_gid)
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, user=self.run_as, cwd=self.home, timeout=120,
        )  # fmt: skip
        # A log file the server's user can write, in the home it owns.
        self.log = self.home / "postgres.out"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def user(self) -> str | None:
        return self.run_as

    def command(self) -> list[str]:
        return [
            str(self.bindir / "postgres"),
            "-D", str(self.data),
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.home}",
            "-c", "max_connections=60",
            "-c", "shared_buffers=32MB",
        ]  # fmt: skip

    def is_ready(self) -> bool:
        if not port_open(self.port):
            return False
        probe = subprocess.run(
            [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-t", "2"],
            capture_output=True, timeout=30,
        )  # fmt: skip
        return probe.returncode == 0

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


# -- NATS JetStream ---------------------------------------------------------------------------------


def require_nats() -> str:
    found = shutil.which("nats-server")
    if found is None:
        missing("nats-server", "apt-get install nats-server")
    assert found is not None
    return found


class NatsServer(PrivateServer):
    """A ``nats-server -js`` of the test's own, its JetStream store in ``directory``;
    restarted with the same store, it recovers its streams and consumers from it."""

    name = "nats"

    def __init__(self, directory: Path, binary: str) -> None:
        super().__init__(directory)
        self.binary = binary

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.binary, "-js", "-sd", str(self.dir / "store"), "-a", "127.0.0.1", "-p", str(self.port)]

    def is_ready(self) -> bool:
        # nats-server logs "Server is ready" once JetStream has loaded its store.
        return port_open(self.port) and tail(self.log, 5000).count("Server is ready") >= len(self.start_seconds) + 1


# -- RabbitMQ ---------------------------------------------------------------------------------------


def rabbit_bin() -> Path | None:
    """The RabbitMQ server script that runs as the calling user (Debian's
    /usr/sbin/rabbitmq-server switches to the rabbitmq user and its directories)."""
    for candidate in ("/usr/lib/rabbitmq/bin/rabbitmq-server",):
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    found = shutil.which("rabbitmq-server")
    return Path(found) if found else None


def require_rabbit() -> Path:
    found = rabbit_bin()
    if found is None:
        missing("rabbitmq-server", "apt-get install rabbitmq-server")
    assert found is not None
    return found


class RabbitServer(PrivateServer):
    """A RabbitMQ node of the test's own: its own node name, AMQP and distribution
    ports, database (``RABBITMQ_MNESIA_BASE``), logs, configuration and enabled plugins
    (none: no management plugin), Erlang cookie (``HOME``). It registers its name with
    the machine's ``epmd`` (the Erlang name registry, started if absent), as every node
    does. Killed -9, it restarts from its database: the quorum queue's log keeps every
    message whose publish was confirmed."""

    name = "rabbit"

    def __init__(self, directory: Path, script: Path, node: str) -> None:
        super().__init__(directory)
        self.script = script
        self.node = f"{node}@localhost"
        (directory / "enabled_plugins").write_text("[].\n")
        (directory / "rabbitmq.conf").write_text("log.console = true\nlog.console.level = warning\n")
        self.complete = 0  # "startup complete" lines seen so far

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def environment(self) -> dict[str, str]:
        base = self.dir
        return {
            **os.environ,
            "HOME": str(base),  # the Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(base / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
        }

    def command(self) -> list[str]:
        return [str(self.script)]

    def is_ready(self) -> bool:
        # The AMQP port opens once the node has booted (its queues recovered).
        return port_open(self.port) and self.amqp_answers()

    def amqp_answers(self) -> bool:
        async def probe() -> None:
            import aio_pika

            connection = await aio_pika.connect(self.url, timeout=5)
            await connection.close()

        try:
            asyncio.run(probe())
        except Exception:
            return False
        return True
