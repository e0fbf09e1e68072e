"""Sharded (FSDP2) training end to end, with real torchrun processes (CPU, gloo):

- a save on 2 ranks loads bitwise (model and AdamW) on 3 and 4 ranks (resharded by DCP) and
  in one plain process (`ksuit.load_model`, no process group);
- a run stopped in the middle of an epoch on 2 ranks resumes on 3, and on 1: every remaining
  sample of the epoch is consumed exactly once, the run completes and its checkpoints verify;
- a 512 MiB set written by 2 ranks exports to one file bitwise, holding at most its largest
  tensor plus 64 MiB.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import assert_bitwise_equal
from tests.e2e.torchrun import HERE, run, torchrun
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.readers.model_loading import load_model, load_payload
from ksuit.storage import load_file
from ksuit.trainers.sampler import epoch_order

pytestmark = pytest.mark.slow

CONFIG = HERE / "sharded_elastic.yaml"
SAVED_AT = 4  # updates into the first epoch (of 10, 12 samples each)
LEAVES = ("autoencoder.encoder", "autoencoder.decoder")


def train(nproc: int, out: Path, *options: str, **env: str) -> str:
    args = [
        "-m",
        "ksuit",
        "train",
        str(CONFIG),
        *options,
        "--output",
        str(out),
        "--run-id",
        "run",
        "--no-progress",
    ]
    return run(torchrun(nproc, *args), **env)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A run of 2 ranks stopped after `SAVED_AT` updates of its first epoch (its `last` and
    `latest` sets), with what it sampled and the full state it saved."""
    out = tmp_path_factory.mktemp("elastic")
    train(
        2,
        out,
        "trainer.max_epochs=null",
        f"trainer.max_updates={SAVED_AT}",
        KSUIT_TEST_SAMPLE_LOG=str(out / "first"),
        KSUIT_TEST_DUMP=str(out / "saved"),
    )
    return out


def copy_run(saved: Path, to: Path) -> Path:
    shutil.copytree(saved / "run", to / "run")
    return to


def test_a_save_on_2_ranks_loads_bitwise_on_3_and_4_ranks_and_in_one_process(saved, tmp_path):
    expected = torch.load(saved / "saved.after", weights_only=True)
    for nproc in (3, 4):
        out = copy_run(saved, tmp_path / str(nproc))
        # resumed at its end: loads (resharded), dumps what it loaded, trains nothing
        train(
            nproc,
            out,
            "trainer.max_epochs=null",
            f"trainer.max_updates={SAVED_AT}",
            "--resume",
            KSUIT_TEST_DUMP=str(out / "loaded"),
        )
        assert_bitwise_equal(torch.load(out / "loaded.before", weights_only=True), expected, f"{nproc} ranks")
    folder = saved / "run" / "checkpoints"
    for leaf in LEAVES:  # one plain process: no process group at all
        model = load_model(folder / f"{leaf}_cp=last_model.dcp")
        assert_bitwise_equal(model.state_dict(), expected[leaf]["model"], leaf)
        assert_bitwise_equal(
            load_payload(folder / f"{leaf}_cp=last_optim.dcp"), expected[leaf]["optim"], leaf
        )


def samples(log: Path) -> dict[int, list[int]]:
    """`{update: indices}` of every rank's log `<log>.<rank>` (each rank's part of the batch)."""
    result: dict[int, list[int]] = {}
    for path in sorted(log.parent.glob(log.name + ".*")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            result.setdefault(entry["update"], []).extend(entry["index"])
    return result


def check_each_sample_once(first: dict[int, list[int]], resumed: dict[int, list[int]]) -> None:
    assert sorted(first) == list(range(SAVED_AT)) and min(resumed) == SAVED_AT
    every = {**first, **resumed}
    assert sorted(every) == list(range(20))
    for epoch in (0, 1):
        order = epoch_order(120, seed=0, epoch=epoch)
        for u in range(10):
            update = 10 * epoch + u
            # the global batch of an update: the same samples on any number of ranks
            assert sorted(every[update]) == sorted(order[12 * u : 12 * (u + 1)]), update
        seen = [i for u in range(10 * epoch, 10 * epoch + 10) for i in every[u]]
        assert sorted(seen) == list(range(120)), f"epoch {epoch}: a sample missing or seen twice"


def verify(run_dir: Path) -> None:
    result = CliRunner().invoke(app, ["verify", str(run_dir)])
    assert result.exit_code == 0, result.output


def test_a_run_stopped_mid_epoch_on_2_ranks_resumes_on_3(saved, tmp_path):
    out = copy_run(saved, tmp_path)
    output = train(3, out, "--resume", KSUIT_TEST_SAMPLE_LOG=str(out / "resumed"))
    assert "resuming a run of 2 processes on 3" in output
    check_each_sample_once(samples(saved / "first"), samples(out / "resumed"))
    verify(out / "run")
    trainer = load_file(out / "run" / "checkpoints" / "autoencoder_cp=last_trainer.th")
    assert trainer["rng"]["world_size"] == 3
    assert [(e["from_world_size"], e["world_size"], e["update"]) for e in trainer["elastic"]] == [
        (2, 3, SAVED_AT)
    ]


def test_a_run_stopped_mid_epoch_on_2_ranks_resumes_in_one_process(saved, tmp_path, monkeypatch):
    out = copy_run(saved, tmp_path)
    monkeypatch.setenv("KSUIT_TEST_SAMPLE_LOG", str(out / "resumed"))
    monkeypatch.syspath_prepend(str(HERE))
    args = ["train", str(CONFIG), "--output", str(out), "--run-id", "run", "--resume", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    check_each_sample_once(samples(saved / "first"), samples(out / "resumed"))
    verify(out / "run")


def test_export_of_a_512_mib_two_rank_set_is_bitwise_and_bounded(tmp_path):
    total_mib, tensors = 512, 4
    run(torchrun(2, str(HERE / "sharded_big.py"), str(tmp_path), str(total_mib), str(tensors)), timeout=400)
    target = tmp_path / "big.th"
    done = subprocess.run(
        [
            sys.executable,
            str(HERE.parent / "storage" / "export_memory.py"),
            str(tmp_path / "big_cp=latest_model.dcp"),
            "torch",
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    largest = total_mib // tensors << 20
    extra = (report["after_kib"] - report["before_kib"]) * 1024
    assert extra <= largest + (64 << 20), f"{extra >> 20} MiB for a largest tensor of {largest >> 20} MiB"
    sys.path.insert(0, str(HERE))
    try:
        from sharded_big import COLUMNS, MIB, full_tensor
    finally:
        sys.path.remove(str(HERE))
    exported = torch.load(target, weights_only=True, mmap=True)["state_dict"]
    rows = total_mib * MIB // tensors // (4 * COLUMNS)
    for i in range(tensors):
        assert torch.equal(exported[f"w{i}"], full_tensor(i, 2, rows)), i


def test_the_sharded_example_trains_under_torchrun(tmp_path):
    example = HERE.parents[1] / "examples" / "autoencoder_sharded.yaml"
    args = ["-m", "ksuit", "train", str(example), "trainer.max_epochs=1", "--output", str(tmp_path)]
    run(torchrun(2, *args, "--run-id", "demo", "--no-progress"))
    folder = tmp_path / "demo" / "checkpoints"
    for name in ("autoencoder.encoder_cp=last_model.dcp", "autoencoder.decoder_cp=latest_optim.dcp"):
        assert sorted(p.name for p in (folder / name).iterdir()) == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "ksuit.th",
        ], name
    verify(tmp_path / "demo")
