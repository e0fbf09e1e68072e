"""Launching real torchrun jobs from tests: `--standalone` rendezvous (torchrun binds a free port
itself: no port picked by the test that another process could take meanwhile), CPU, one thread."""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def env(**extra: str) -> dict[str, str]:
    result = dict(os.environ)
    result.update(extra)
    result["PYTHONPATH"] = os.pathsep.join([str(HERE), result.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result["OMP_NUM_THREADS"] = "1"
    if "KSUIT_INIT_METHOD" not in extra:
        result.pop("KSUIT_INIT_METHOD", None)
    return result


def torchrun(nproc: int, *args: str, max_restarts: int = 0) -> list[str]:
    """The command line of `torchrun --standalone --nproc_per_node=nproc ARGS` (ARGS: a script
    and its arguments, or `-m module ...`)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
        *args,
    ]


def run(command: list[str], timeout: float = 240, **extra_env: str) -> str:
    done = subprocess.run(command, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-10000:]
    return done.stdout + done.stderr
