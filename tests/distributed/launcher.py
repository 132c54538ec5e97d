"""Start N ranks of a worker script as torchrun would (its environment variables), on the loopback interface."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

LAUNCH_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(worker: str, args: list[str], world: int = 2) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for r in range(world):
        env = {
            **os.environ,
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(subprocess.Popen([sys.executable, worker, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = LAUNCH_TIMEOUT_S) -> list[tuple[int, str]]:
    """Wait for every rank (all within ``timeout`` seconds, then they are killed); (returncode, stderr) per rank."""
    out = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def run(worker: str, args: list[str], world: int = 2, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Run the ranks to completion; fail with the stderr of any rank that failed."""
    results = finish(start(worker, args, world), timeout)
    for r, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {r} of {world} exited with {rc}:\n{err[-3000:]}"
