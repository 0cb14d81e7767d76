"""Real Redis-protocol servers for the fleet-cache tests: one node, or a 3-node cluster.

The binary is the system's ``redis-server`` (Debian's package, which ``setup.sh``
installs), or ``valkey-server`` where that is what is installed. Each store is
a subprocess on a free port (or a Unix socket) in the test's temporary folder,
with persistence off, and is killed when the test ends. Freezing one (SIGSTOP)
and killing it (SIGKILL) are real signals to the real process.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from forkloop.loadtest.servers import free_port
from tests.server.master_support import wait_for


def store_binary(name: str = "server") -> str:
    """``redis-server`` / ``redis-cli`` (or Valkey's), which setup.sh installs."""
    for candidate in (f"redis-{name}", f"valkey-{name}"):
        found = shutil.which(candidate)
        if found is not None:
            return found
    raise AssertionError(f"no redis-{name} or valkey-{name} on PATH: run ./setup.sh")


def _ping(port: int | None, unix: Path | None) -> bool:
    family = socket.AF_UNIX if unix is not None else socket.AF_INET
    address = str(unix) if unix is not None else ("127.0.0.1", port)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(address)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher) is free too, below the
    kernel's ephemeral range (a cluster node's port must be 55535 or less)."""
    while True:
        port = random.randrange(20000, 30000)
        if _free(port) and _free(port + 10000):
            return port


class StoreUnderTest:
    """One redis-server process on 127.0.0.1 (or a Unix socket when ``unix`` is set)."""

    def __init__(self, folder: Path, unix: bool = False, cluster: bool = False) -> None:
        self.port = cluster_port() if cluster else free_port()
        self.folder = folder / f"store-{self.port}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.unix = self.folder / "redis.sock" if unix else None
        self.cluster = cluster
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.unix is not None:
            return f"unix://{self.unix}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> StoreUnderTest:
        command = [
            store_binary(),
            "--port",
            "0" if self.unix is not None else str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.folder / "redis.log"),
        ]
        if self.unix is not None:
            command += ["--unixsocket", str(self.unix), "--unixsocketperm", "700"]
        if self.cluster:
            command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            command += ["--cluster-node-timeout", "1000"]  # a dead master is failed over in ~2 s
            # replicas copy their master at once, and may always take over from it
            command += ["--repl-diskless-sync-delay", "0", "--cluster-replica-validity-factor", "0"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        if not wait_for(lambda: _ping(self.port, self.unix), 10):
            self.kill()
            raise AssertionError(f"redis-server did not answer:\n{self.log()}")
        return self

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(5)
            self.process = None

    def cli(self, *arguments: str) -> str:
        where = ["-s", str(self.unix)] if self.unix is not None else ["-p", str(self.port)]
        done = subprocess.run(
            [store_binary("cli"), *where, *arguments],
            capture_output=True,
            timeout=10,
            check=True,
        )
        return done.stdout.decode()


class ClusterUnderTest:
    """Three masters (and a replica each, with ``replicas=1``): every slot assigned,
    ``cluster_state:ok`` on each node."""

    def __init__(self, folder: Path, replicas: int = 0) -> None:
        self.replicas = replicas
        self.nodes = [StoreUnderTest(folder, cluster=True) for _ in range(3 * (1 + replicas))]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> ClusterUnderTest:
        """Start every node and make the cluster; on any failure, stop what started."""
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [store_binary("cli"), "--cluster", "create", *addresses]
                + ["--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_output=True,
                timeout=30,
                check=True,
            )
            self.wait_until_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ok(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                assert wait_for(lambda n=node: "cluster_state:ok" in n.cli("cluster", "info"), 15)
                assert wait_for(lambda n=node: _replica_ready(n.cli("info", "replication")), 15)

    def node_of(self, key: str) -> StoreUnderTest:
        """The master that serves ``key``'s slot."""
        slot = int(self.nodes[0].cli("cluster", "keyslot", key))
        for line in self.nodes[0].cli("cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(node for node in self.nodes if node.port == port)
        raise AssertionError(f"no node serves slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def _replica_ready(info: str) -> bool:
    """A master is ready; a replica once its link to its master is up."""
    return "role:master" in info or "master_link_status:up" in info
