"""Start two CPU processes under torchrun for a test, and say plainly how it went wrong when it does.

- `--standalone`: torchrun's own rendezvous binds a free port itself (port 0), so two tests, or another program,
  can never race for a port picked beforehand; a collision reported anyway is retried with a fresh rendezvous.
- a wall-clock timeout: the whole process group is killed and the test fails naming the ranks still running.
- a failure names each failed rank with its exit code or signal, from torchrun's own report.
- one thread per process, so the result does not depend on how many cores are free.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
COLLISION = re.compile(r"address already in use|EADDRINUSE|DistNetworkError", re.IGNORECASE)


def env() -> dict:
    """One thread per process and the source tree importable, whatever the caller's environment."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def failed_ranks(output: str) -> list[str]:
    """'rank 1: signal 6 (SIGABRT)'-style lines from torchrun's ChildFailedError report."""
    found = []
    for block in re.split(r"\n(?=\[\d+\]:|Root Cause)", output):
        rank = re.search(r"rank\s*:\s*(\d+)", block)
        code = re.search(r"exitcode\s*:\s*(-?\d+)", block)
        if not (rank and code):
            continue
        value = int(code.group(1))
        if value < 0:
            try:
                name = signal.Signals(-value).name
            except ValueError:
                name = "unknown signal"
            found.append(f"rank {rank.group(1)}: killed by signal {-value} ({name})")
        else:
            found.append(f"rank {rank.group(1)}: exit code {value}")
    return sorted(set(found))


def describe(run: subprocess.CompletedProcess) -> str:
    output = (run.stdout or "") + (run.stderr or "")
    ranks = failed_ranks(output)
    head = "; ".join(ranks) if ranks else f"torchrun exit code {run.returncode}"
    return f"two-process run failed ({head}); last output:\n{output[-3000:]}"


def start(args: list[str], **popen) -> subprocess.Popen:
    """torchrun with two processes in its own process group (so a timeout can kill every rank)."""
    return subprocess.Popen(TORCHRUN + [str(a) for a in args], env=env(), start_new_session=True, **popen)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_two(args: list[str], timeout: float = 300, attempts: int = 3) -> subprocess.CompletedProcess:
    """Run ``args`` (a script or ``-m module ...``) on two ranks; fail the test with a clear message on a timeout
    or a non-zero exit, retrying only a rendezvous port collision."""
    for attempt in range(attempts):
        process = start(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process)
            raise AssertionError(f"two-process run of {' '.join(map(str, args[:3]))} did not finish within "
                                 f"{timeout:.0f} s; every rank was killed") from None
        run = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        if run.returncode == 0:
            return run
        if COLLISION.search(stdout + stderr) and attempt + 1 < attempts:
            continue
        raise AssertionError(describe(run))
    raise AssertionError("unreachable")
