"""A real Ray cluster on this machine for the tests: a head node and a worker node, each a ``ray start --block``
process of its own (not ``local_mode``, not an in-process instance).

Isolation from any other Ray on the machine: a temp dir of its own (``--temp-dir``), explicit ports, a token of
its own (``RAY_AUTH_MODE=token``, the token in the temp dir: a driver needs :attr:`LocalCluster.env`), no
dashboard, no usage stats. ``ray stop`` is never used: it stops every Ray process of the user, found by name.
The cluster is stopped by its own processes' ids instead: the two ``ray start`` processes get SIGTERM (they stop
their raylet, GCS and agents), then whatever of their process trees (workers included, which run in process
groups of their own) is still alive gets SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Teardown without Ray's 30 s drain of a node on SIGTERM (meant for Serve replicas on Kubernetes).
NODE_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_USAGE_STATS_ENABLED": "0"}

_WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[3])
while sum(1 for n in ray.nodes() if n["Alive"]) < int(sys.argv[2]):
    if time.monotonic() > deadline:
        sys.exit(f"only {sum(1 for n in ray.nodes() if n['Alive'])} nodes joined")
    time.sleep(0.2)
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stat(pid: int | str) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process from /proc, or None when it is gone."""
    try:
        # the command name (field 2) may hold spaces and parentheses: split after its last ")"
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return f[0], int(f[1]), int(f[19])
    except (OSError, ValueError, IndexError):
        return None


def _table() -> dict[int, tuple[str, int, int]]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(d.name)) is not None:
            out[int(d.name)] = st
    return out


def _alive(proc: tuple[int, int]) -> bool:
    """Whether the process (pid, start time) still runs: not a zombie, and its pid not reused since."""
    st = _stat(proc[0])
    return st is not None and st[0] != "Z" and st[2] == proc[1]


@dataclass
class LocalCluster:
    address: str
    temp_dir: Path
    env: dict[str, str]  # the environment of a process that joins this cluster (its token)
    nodes: list[subprocess.Popen] = field(default_factory=list)

    def processes(self) -> set[tuple[int, int]]:
        """(pid, start time) of the ``ray start`` processes and of everything they started, now."""
        table = _table()
        found = {n.pid for n in self.nodes if n.pid in table}
        while True:
            more = {pid for pid, st in table.items() if st[1] in found} - found
            if not more:
                return {(pid, table[pid][2]) for pid in found}
            found |= more

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is a process of this cluster (so a test may kill it)."""
        return any(p == pid for p, _ in self.processes())

    def stop(self) -> None:
        procs = self.processes()
        for node in self.nodes:
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in procs):
            time.sleep(0.1)
        for proc in procs:
            if _alive(proc):
                with contextlib.suppress(OSError):
                    os.kill(proc[0], signal.SIGKILL)
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=5)


def _node_args(ports: list[int]) -> list[str]:
    return [
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--node-manager-port={ports[0]}",
        f"--object-manager-port={ports[1]}",
        f"--dashboard-agent-listen-port={ports[2]}",
        f"--dashboard-agent-grpc-port={ports[3]}",
        f"--runtime-env-agent-port={ports[4]}",
        f"--metrics-export-port={ports[5]}",
        f"--object-store-memory={200 * 2**20}",
        "--disable-usage-stats",
        "--include-log-monitor=false",
    ]


@contextlib.contextmanager
def local_cluster(head_cpus: int = 2, worker_cpus: int = 1, timeout: float = 90) -> Iterator[LocalCluster]:
    """Start a head node (``head_cpus`` logical CPUs) and one worker node (``worker_cpus``); stop both after.
    The temp dir is short (Ray's socket paths must fit in 107 bytes) and removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="albef-ray-", dir="/tmp"))
    ports = free_ports(13)
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, **NODE_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    cluster = LocalCluster(f"127.0.0.1:{ports[0]}", tmp, env)
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts", "start"]
    try:
        head = [
            *ray_cli,
            "--head",
            f"--port={ports[0]}",
            f"--temp-dir={tmp}",
            "--include-dashboard=false",
            f"--num-cpus={head_cpus}",
            *_node_args(ports[1:7]),
        ]
        with open(tmp / "head.log", "wb") as out:
            cluster.nodes.append(
                subprocess.Popen(head, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            )
        deadline = time.monotonic() + timeout
        while True:  # the GCS port answers
            if cluster.nodes[0].poll() is not None:
                raise RuntimeError(f"the Ray head exited: {(tmp / 'head.log').read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", ports[0]), timeout=0.5).close()
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the Ray head did not open its port")
            time.sleep(0.1)
        worker = [
            *ray_cli,
            f"--address={cluster.address}",
            f"--num-cpus={worker_cpus}",
            *_node_args(ports[7:13]),
        ]
        with open(tmp / "worker.log", "wb") as out:
            cluster.nodes.append(
                subprocess.Popen(
                    worker, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            )
        wait = subprocess.run(
            [sys.executable, "-c", _WAIT_FOR_NODES, cluster.address, "2", str(timeout)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout + 30,
        )
        if wait.returncode != 0:
            raise RuntimeError(f"the Ray cluster did not come up: {wait.stderr[-3000:]}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
