"""`make bench` keeps working: the benchmark scripts run end to end on a tiny state and write
results from which every goal is evaluated. (The numbers themselves come from a full run.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(args, tmp_path):
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_save_load_benchmark_measures_each_method_and_judges_every_goal(tmp_path):
    out = tmp_path / "results.json"
    methods = [
        "ksuit_sync_torch",
        "torch_save",
        "many_files",
        "load_ksuit_th",
        "resume_ksuit",
        "resume_torch_mmap",
    ]
    _run(
        [
            BENCH / "bench_save_load.py",
            "--scale",
            "0.002",
            "--dir",
            tmp_path / "b",
            "--out",
            out,
            "--only",
            *methods,
        ],
        tmp_path,
    )
    data = json.loads(out.read_text())
    for method in methods:
        assert data["results"][method]["seconds"] > 0, (method, data["results"][method])
    verdicts = {t["target"]: t["met"] for t in data["targets"]}
    assert verdicts, "no goal was evaluated"
    # a goal whose two numbers were measured gets a verdict; one that needs an absent method does not
    assert any(v is not None for v in verdicts.values())
    assert any(v is None for v in verdicts.values())
    table = _run([BENCH / "readme_table.py", out], tmp_path).stdout
    assert "**ksuit save, `.th`**" in table and "| target |" in table
