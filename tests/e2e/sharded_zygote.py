"""A torchrun worker that imports ksuit once, then runs each training attempt of the test in a
forked child: `ksuit train` (the CLI function itself) under the rank of this worker, meeting the
other rank through a file store of the attempt. The test SIGKILLs the children (one rank or
all) at random instants; the workers live on, so no attempt pays for importing torch again.

Control folder protocol: the test writes `go.<n>` (JSON: the train command's arguments, or
null to stop); each worker writes `pid.<n>.<rank>` once its child runs and `done.<n>.<rank>`
(the child's wait status) when it ended.
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed.checkpoint
import torch.distributed.fsdp
import torch.distributed.tensor  # noqa: F401
import typer

import ksuit.storage.sharded.consolidate
import ksuit.storage.sharded.load
import ksuit.trainers.reconstruction
import ksuit.trainers.runner  # noqa: F401
from ksuit.cli.train import train_command


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_attempt(control: Path, attempt: int, rank: int, args: dict) -> int:
    os.environ["KSUIT_INIT_METHOD"] = f"file://{control}/store.{attempt}"
    write_atomic(control / f"pid.{attempt}.{rank}", str(os.getpid()))
    try:
        train_command(
            config=Path(args["config"]),
            overrides=args.get("overrides", []),
            output=Path(args["output"]),
            run_id=args["run_id"],
            resume=args.get("resume", False),
            progress=False,
        )
        return 0
    except typer.Exit as e:
        return int(e.exit_code)
    except BaseException:
        traceback.print_exc()
        return 1


def main() -> None:
    control = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    attempt = 0
    while True:
        go = control / f"go.{attempt}"
        while not go.exists():
            time.sleep(0.005)
        job = json.loads(go.read_text())
        if job is None:
            return
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run_attempt(control, attempt, rank, job)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        write_atomic(control / f"done.{attempt}.{rank}", str(status))
        attempt += 1


if __name__ == "__main__":
    main()
