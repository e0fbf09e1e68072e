"""Two processes saving the same run at the same time on S3 (moto over HTTP): both read the head,
both stage their files, both try to commit at once: exactly one advances `latest`, the other
gets `ConcurrentWriterError` naming the run, and its staged objects are removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ksuit.storage import load_file, open_backend

CHILD = r"""
import sys, torch
from ksuit.storage import ConcurrentWriterError, PendingFile, SetWriter, open_backend
from ksuit.storage.objectstore.commit import ObjectSetTransaction

real_commit = ObjectSetTransaction.commit

def commit(self, manifests, sequence):  # both processes reach the commit, then go at once
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"
    real_commit(self, manifests, sequence)

ObjectSetTransaction.commit = commit
value = float(sys.argv[2])
it = {"epoch": 0, "update": 1, "sample": 4}
payload = {"state_dict": {"w": torch.full((4,), value)}}
files = [PendingFile("m_cp=latest_model.th", payload, "torch", "model", "m", "latest", it)]
try:
    SetWriter(open_backend(sys.argv[1])).write(files, run_id="run")
    print("committed", flush=True)
except ConcurrentWriterError as e:
    print("refused", e, flush=True)
"""


@pytest.mark.slow
def test_two_writers_racing_on_one_run_exactly_one_advances_latest(s3):
    url = f"{s3.url}/runs/run/checkpoints"
    root = Path(__file__).resolve().parents[3]
    env = {
        **os.environ,
        **s3.env,
        "PYTHONPATH": f"{root / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(value)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for value in (1.0, 2.0)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:  # both have read the head and staged their files
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    outcomes = sorted(out.split()[0] for out in outs)
    assert outcomes == ["committed", "refused"], outs
    winner = 1.0 if outs[0].startswith("committed") else 2.0
    refusal = next(out for out in outs if out.startswith("refused"))
    assert "committed to run run in" in refusal and "two processes are saving the same run" in refusal
    assert load_file(f"{url}/m_cp=latest_model.th")["state_dict"]["w"][0] == winner
    backend = open_backend(url)
    head = backend.read_head(fresh=True).head
    (save,) = head.saves()
    data = [k for k in s3.keys() if "/.ksuit/data/" in k]
    assert data and all(save in k for k in data), data  # the loser removed what it staged
