"""Crash consistency under power loss: every state a power cut during a save could leave.

SIGKILL tests (`test_kill.py`) show what a crashed *process* leaves: the page cache survives.
A power cut can leave less: only what was fsynced, with directory operations possibly
reordered. Here every file-system operation of real saves is recorded (`crash_sim.Recorder`),
the states a power cut at each point could leave are built under an ordered model and a
reordering (POSIX) model (`crash_sim.crash_states`), and each state is checked in a fresh
process (`crash_check_worker.py`): recovery leaves no temporary file or journal, every set in
the folder is complete and of one training iteration, resume picks a set that loads and is
consistent, and progress never goes back past the last save that returned.

Scenarios (the small composite model of `tests/conftest.py`: encoder and decoder weights and
AdamW states plus a trainer file, progress tag and `latest` in every save, the identical
optimizer and trainer files of the two tags hard-linked): a sync save over an existing set, two
async saves (`CheckpointWriter(async_save=True)`), three consecutive sync saves from an empty
folder (`latest` rewritten twice), and a save under a retention policy (`keep_last: 1`) that
deletes the previous progress set after committing (the journaled delete). Every state must
also hold no checkpoint file that no manifest lists (what `ksuit verify` would report). The
fast test checks a seeded sample of the states; the slow one checks them all. Run with `-s` to see the counts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

import ksuit
import ksuit.storage.local.staging as staging
import ksuit.storage.sets as transaction
from ksuit.providers import PathProvider
from ksuit.retention import RetentionPolicy
from ksuit.storage import LocalBackend
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.writers.checkpoint_writer import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step
from tests.storage.crash_sim import CrashState, Recorder, Recording, crash_states

WORKER = Path(__file__).with_name("crash_check_worker.py")
SRC = Path(ksuit.__file__).resolve().parents[1]  # the worker checks the code under test


class Run:
    """A run of the small composite model whose saves can be recorded."""

    def __init__(self, root: Path, async_save: bool = False, retention: RetentionPolicy | None = None):
        self.provider = PathProvider(root, "run")
        self.folder = self.provider.checkpoint_path
        LocalBackend(self.folder).ensure_folder()  # recorded saves start in an existing folder
        self.counter = UpdateCounter(
            None, TrainingIteration(epoch=30), updates_per_epoch=20, effective_batch_size=4
        )
        self.model = Autoencoder(autoencoder_config()).initialize()
        self.writer = CheckpointWriter(
            self.provider, self.counter, async_save=async_save, retention=retention
        )

    def save(self) -> int:
        """One update (one optimizer step per submodel), then a save of a progress tag and latest."""
        train_one_step(self.model)
        self.counter.next_update()
        self.counter.add_samples(4)
        self.writer.save(
            self.model,
            str(self.counter.cur_iteration),
            trainer=FakeTrainer(self.counter),
            save_latest_weights=True,
            save_latest_optim=True,
        )
        return self.counter.update


def record(run: Run, initial_label: dict | None, saves: int, monkeypatch: pytest.MonkeyPatch) -> Recording:
    """Records `saves` saves of `run`; a mark follows every set that reached the disk (for an
    async writer: when the background write returned)."""
    real_write_set = transaction.SetWriter.write_set
    recorder = Recorder(run.folder, initial_label)

    def write_set(self, files, run_id=None, on_written=None):
        written = real_write_set(self, files, run_id, on_written)
        recorder.mark(update=files[0].training_iteration["update"])
        return written

    monkeypatch.setattr(transaction.SetWriter, "write_set", write_set)
    with recorder:
        for _ in range(saves):
            run.save()
        run.writer.flush()
    monkeypatch.setattr(transaction.SetWriter, "write_set", real_write_set)
    run.writer.close()
    return recorder.recording


def sync_save(root: Path, monkeypatch: pytest.MonkeyPatch) -> Recording:
    run = Run(root)
    first = run.save()
    return record(run, {"update": first}, 1, monkeypatch)


def async_saves(root: Path, monkeypatch: pytest.MonkeyPatch) -> Recording:
    run = Run(root, async_save=True)
    first = run.save()
    run.writer.flush()
    return record(run, {"update": first}, 2, monkeypatch)


def latest_rewrites(root: Path, monkeypatch: pytest.MonkeyPatch) -> Recording:
    return record(Run(root), None, 3, monkeypatch)


def retention_delete(root: Path, monkeypatch: pytest.MonkeyPatch) -> Recording:
    """Two saves before recording (so the recorded one deletes a set, not the first save), then
    one recorded save: its commit, then the delete of the progress set it replaces."""
    run = Run(root, retention=RetentionPolicy(keep_last=1))
    run.save()
    first = run.save()
    return record(run, {"update": first}, 1, monkeypatch)


SCENARIOS: dict[str, Callable[[Path, pytest.MonkeyPatch], Recording]] = {
    "sync save": sync_save,
    "async saves": async_saves,
    "latest rewrites": latest_rewrites,
    "retention delete": retention_delete,
}


def scratch_dir(tmp_path: Path) -> Path:
    """A tmpfs folder when there is one (fsync is free there; the states are many), else tmp_path."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="ksuit-crash-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="ksuit-crash-", dir=tmp_path))


def stratified_sample(states: list[CrashState], per_point: int, rng: random.Random) -> list[CrashState]:
    """Every ordered-model state, and up to `per_point` reordering states per crash point (so
    every instant of the protocol is covered, e.g. the one between a journal's rename and the
    fsync of its folder)."""
    by_point: dict[int, list[CrashState]] = {}
    for state in states:
        if state.model == "reorder":
            by_point.setdefault(state.point, []).append(state)
    chosen = [s for s in states if s.model != "reorder"]
    for point in sorted(by_point):
        group = by_point[point]
        chosen += group if len(group) <= per_point else rng.sample(group, per_point)
    return chosen


def check_states(
    recordings: dict[str, Recording], sample: int | None, tmp_path: Path, trust_journals_blindly: bool = False
) -> dict:
    """Builds the crash states of every recording (all, or a seeded `stratified_sample` with
    `sample` states per crash point) and checks them in one fresh process. Returns counts and
    failures."""
    scratch = scratch_dir(tmp_path)
    try:
        blobs_dir, work_dir = scratch / "blobs", scratch / "work"
        blobs_dir.mkdir()
        work_dir.mkdir()
        states, meta, counts = [], {}, {}
        for scenario, rec in recordings.items():
            found = list(crash_states(rec))
            if sample is not None:
                found = stratified_sample(found, sample, random.Random(f"{scenario}-8"))
            for state in found:
                files = []
                for name, data in state.files:
                    key = xxhash.xxh3_128_hexdigest(data)
                    if not (blobs_dir / key).exists():
                        (blobs_dir / key).write_bytes(data)
                    files.append((name, key))
                returned = state.returned["update"] if state.returned else None
                meta[len(states)] = (scenario, state)
                states.append({"id": len(states), "files": files, "returned": returned})
                counts[(scenario, state.model)] = counts.get((scenario, state.model), 0) + 1
        job, result = scratch / "job.json", scratch / "result.json"
        job.write_text(
            json.dumps(
                {
                    "blobs_dir": str(blobs_dir),
                    "work_dir": str(work_dir),
                    "states": states,
                    "trust_journals_blindly": trust_journals_blindly,
                }
            )
        )
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.run(
            [sys.executable, str(WORKER), str(job), str(result)], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(result.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    failures: dict[tuple[str, str], list[str]] = {}
    for failed in out["failed"]:
        scenario, state = meta[failed["id"]]
        where = f"point {state.point}, lost ops {list(state.lost)}, data {state.data}"
        failures.setdefault((scenario, state.model), []).append(f"{where}: {'; '.join(failed['violations'])}")
    return {"counts": counts, "failures": failures, "checked": out["checked"], "seconds": out["seconds"]}


def summary(result: dict) -> str:
    lines = [f"{result['checked']} crash states checked in {result['seconds']:.1f}s"]
    for (scenario, model), n in sorted(result["counts"].items()):
        bad = result["failures"].get((scenario, model), [])
        lines.append(f"  {scenario:16} {model:8} {n:5} states, {len(bad)} violating")
        lines += [f"      {v}" for v in bad[:3]]
    return "\n".join(lines)


def recordings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Recording]:
    return {name: make(tmp_path / name.replace(" ", "-"), monkeypatch) for name, make in SCENARIOS.items()}


def test_power_cut_states_sampled(tmp_path, monkeypatch):
    result = check_states(recordings(tmp_path, monkeypatch), sample=4, tmp_path=tmp_path)
    print("\n" + summary(result))
    assert not result["failures"], summary(result)


@pytest.mark.slow
def test_power_cut_states_all(tmp_path, monkeypatch):
    result = check_states(recordings(tmp_path, monkeypatch), sample=None, tmp_path=tmp_path)
    print("\n" + summary(result))
    assert not result["failures"], summary(result)


def skip_the_staging_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mutation: the folder is not fsynced between staging and the journal (the old protocol)."""
    real = staging.fsync_dir

    def fsync_dir(path):
        if sys._getframe(1).f_code.co_name != "commit":
            real(path)

    monkeypatch.setattr(staging, "fsync_dir", fsync_dir)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("staging_fsync", "checked_journal", "torn"),
    [(False, True, False), (True, False, False), (False, False, True)],
    ids=["checksums-alone", "staging-fsync-alone", "neither"],
)
def test_each_defense_alone_prevents_torn_sets(tmp_path, monkeypatch, staging_fsync, checked_journal, torn):
    """Either the folder fsync before the journal or recovery's check of every staged file
    suffices under the reordering model; without both the test finds torn sets (so it can)."""
    if not staging_fsync:
        skip_the_staging_fsync(monkeypatch)
    recs = {"sync save": sync_save(tmp_path / "run", monkeypatch)}
    result = check_states(recs, sample=40, tmp_path=tmp_path, trust_journals_blindly=not checked_journal)
    print("\n" + summary(result))
    torn_found = any("torn set" in v for vs in result["failures"].values() for v in vs)
    assert torn_found == torn, summary(result)
    if not torn:
        assert not result["failures"], summary(result)


@pytest.mark.slow
def test_a_delete_without_its_journal_leaves_files_no_manifest_lists(tmp_path, monkeypatch):
    """A mutation: sets deleted manifest first, then files, without a journal (the Backend
    interface's default): a crash between the two leaves files `ksuit verify` reports, and the
    check finds them (so it can); the journaled delete above leaves none."""
    from ksuit.storage.backend import Backend

    monkeypatch.setattr(LocalBackend, "delete_set", Backend.delete_set)
    result = check_states({"retention delete": retention_delete(tmp_path / "run", monkeypatch)}, 4, tmp_path)
    print("\n" + summary(result))
    orphans = [v for vs in result["failures"].values() for v in vs if "files no manifest lists" in v]
    assert orphans, summary(result)
