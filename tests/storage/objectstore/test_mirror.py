"""Tiered saving: commit locally at local speed, replicate every committed set to S3 (moto over
HTTP) in the background; a failed upload is retried, then reported, never failing a save or
touching the local set; resume takes the newest complete set of either copy."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from ksuit.initializers import ResumeInitializer
from ksuit.providers import PathProvider
from ksuit.readers import list_checkpoints, scan_sets
from ksuit.storage import PendingFile, StoreAccessError, open_backend
from ksuit.storage.mirror import MirroringSetWriter
from ksuit.storage.objectstore import ObjectStoreBackend
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.writers import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step
from tests.s3_server import FaultProxy, Rule, proxied_options

ITERATION = {"epoch": 0, "update": 1, "sample": 4}


def files(value: float, tag: str = "latest") -> list[PendingFile]:
    return [
        PendingFile(
            f"m_cp={tag}_model.th",
            {"state_dict": {"w": torch.full((8,), value)}},
            "torch",
            "model",
            "m",
            tag,
            ITERATION,
        ),
        PendingFile(f"m_cp={tag}_trainer.th", {"value": value}, "torch", "trainer", "m", tag, ITERATION),
    ]


def manifests(folder) -> dict[str, bytes]:
    backend = open_backend(folder)
    return {
        e.name: backend.read_small(e.name, 1 << 20, "manifest")
        for e in backend.entries()
        if e.name.endswith(".json")
    }


def test_every_committed_set_reaches_the_mirror_as_it_was_committed(s3, tmp_path):
    model = Autoencoder(autoencoder_config()).initialize()
    counter = UpdateCounter(None, TrainingIteration(epoch=30), updates_per_epoch=20, effective_batch_size=4)
    pp = PathProvider(tmp_path / "runs", "run")
    with CheckpointWriter(pp, counter, mirror=s3.url + "/mirror", async_save=True) as writer:
        for _ in range(3):
            train_one_step(model)
            counter.next_update()
            writer.save(
                model,
                str(counter.cur_iteration),
                trainer=FakeTrainer(counter),
                save_latest_weights=True,
                save_latest_optim=True,
            )
    assert writer.mirror_failures == []
    remote = f"{s3.url}/mirror/run"
    assert [c.name for c in list_checkpoints(remote)] == [
        c.name for c in list_checkpoints(pp.run_output_path)
    ]
    assert manifests(f"{remote}/checkpoints") == manifests(pp.checkpoint_path)  # byte for byte
    assert all(s.ok for s in scan_sets(remote, checksum=True))


def test_saving_never_waits_for_the_mirror(s3, tmp_path):
    gate = threading.Event()

    class Gated(ObjectStoreBackend):
        def begin_set(self, manifest_of, needed_bytes):
            assert gate.wait(60), "the gate never opened"
            return super().begin_set(manifest_of, needed_bytes)

    remote = open_backend(s3.url + "/mirror/checkpoints")
    gated = Gated(remote.store, remote.root)
    writer = MirroringSetWriter(tmp_path / "checkpoints", gated)
    for i in range(3):  # the mirror is stuck: the local saves go on
        writer.write(files(float(i), tag=f"E0_U{i}_S0"), run_id="run")
    assert writer.replicator.replicated == 0
    assert len(open_backend(tmp_path / "checkpoints").entries()) == 9
    gate.set()
    writer.close()
    assert writer.replicator.replicated == 3 and writer.failures == []


def test_a_failed_upload_is_retried_then_reported_and_the_local_set_stands(s3, tmp_path):
    with FaultProxy(s3.endpoint.url) as proxy:
        remote = open_backend(s3.url + "/mirror/checkpoints", proxied_options(proxy, ksuit_retry_seconds=0.2))
        writer = MirroringSetWriter(tmp_path / "checkpoints", remote, attempts=3, first_delay=0.01)
        proxy.rules = [Rule("PUT", "/.ksuit/HEAD.json", "503", count=10**6)]  # every commit fails
        writer.write(files(1.0), run_id="run")
        writer.replicator.wait()
        assert len(writer.failures) == 1 and "HEAD.json failed" in str(writer.failures[0].error)
        assert sum(1 for m, p, f in proxy.log if p.endswith("HEAD.json") and m == "PUT") >= 3  # retried
        proxy.rules, proxy.deny_all = [], True  # a permanent error: reported at once
        writer.write(files(2.0), run_id="run")
        writer.close()
    assert isinstance(writer.failures[1].error, StoreAccessError)
    local = open_backend(tmp_path / "checkpoints")
    assert [s.ok for s in scan_sets(local, checksum=True)] == [True]
    assert torch.load(local.open("m_cp=latest_trainer.th").stream(), weights_only=True)["value"] == 2.0


def test_a_newer_waiting_job_replaces_an_older_one_for_the_same_sets(s3, tmp_path):
    gate = threading.Event()

    class Gated(ObjectStoreBackend):
        def begin_set(self, manifest_of, needed_bytes):
            gate.wait(60)
            return super().begin_set(manifest_of, needed_bytes)

    remote = open_backend(s3.url + "/mirror/checkpoints")
    writer = MirroringSetWriter(tmp_path / "checkpoints", Gated(remote.store, remote.root))
    for i in range(4):
        writer.write(files(float(i)), run_id="run")
    gate.set()
    writer.close()
    assert writer.replicator.replicated <= 2  # the one in flight when the gate closed, and the newest
    assert torch.load(remote.open("m_cp=latest_trainer.th").stream(), weights_only=True)["value"] == 3.0


@pytest.mark.parametrize("newer", ["local", "mirror"])
def test_resume_takes_the_newest_complete_set_of_either_copy(s3, tmp_path, newer):
    local_root, mirror_root = tmp_path / "runs", s3.url + "/mirror"
    model = Autoencoder(autoencoder_config()).initialize()
    counter = UpdateCounter(None, TrainingIteration(epoch=30), updates_per_epoch=20, effective_batch_size=4)
    for where in ("local", "mirror") if newer == "mirror" else ("mirror", "local"):
        counter.next_update()
        root = local_root if where == "local" else mirror_root
        with CheckpointWriter(PathProvider(root, "run"), counter) as writer:
            writer.save(model, "latest", trainer=FakeTrainer(counter))
    initializer = ResumeInitializer(local_root / "run", mirror=f"{mirror_root}/run")

    class Trainer:
        model = Autoencoder(autoencoder_config()).initialize()
        rank = 0

    chosen = initializer.select(Trainer())
    assert chosen.training_iteration.update == 2
    assert str(chosen.folder.location).startswith(s3.url if newer == "mirror" else str(local_root))
    shutil.rmtree(local_root)  # a fresh machine: only the mirror is left
    assert initializer.select(Trainer()).training_iteration.update == (2 if newer == "mirror" else 1)


class _Resumed:
    """What `ResumeInitializer.apply` restores: a model, its counter and the trainer state."""

    rank = 0

    def __init__(self) -> None:
        self.model = Autoencoder(autoencoder_config()).initialize()
        self.update_counter = UpdateCounter(
            None, TrainingIteration(epoch=30), updates_per_epoch=20, effective_batch_size=4
        )
        self.resumed_from = None
        self.state: dict | None = None

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.state = state


def _two_copies(tmp_path, s3, updates: dict[str, int]):
    """A `latest` set saved at `updates[copy]` into the local run folder and into the mirror;
    returns the local run folder and the mirror's run location."""
    local_root, mirror_root = tmp_path / "runs", s3.url + "/mirror"
    model = Autoencoder(autoencoder_config()).initialize()
    for where, update in sorted(updates.items(), key=lambda kv: kv[1]):
        counter = UpdateCounter(
            None, TrainingIteration(epoch=30), updates_per_epoch=20, effective_batch_size=4
        )
        for _ in range(update):
            counter.next_update()
        root = local_root if where == "local" else mirror_root
        with CheckpointWriter(PathProvider(root, "run"), counter) as writer:
            writer.save(model, "latest", trainer=FakeTrainer(counter))
    return local_root / "run", f"{mirror_root}/run"


def _count_reads(monkeypatch):
    """Counts the files each kind of backend opens (a read of its bytes) and every separate hash."""
    from collections import Counter

    from ksuit.storage.local import LocalBackend

    opened = {"local": Counter(), "mirror": Counter()}
    hashed = Counter()
    for kind, cls in (("local", LocalBackend), ("mirror", ObjectStoreBackend)):
        original = cls.open

        def counting(self, name, follow_symlinks=False, _original=original, _kind=kind):
            opened[_kind][name] += 1
            return _original(self, name, follow_symlinks)

        monkeypatch.setattr(cls, "open", counting)
        monkeypatch.setattr(cls, "checksum", lambda self, name: hashed.update([name]))
    return opened, hashed


@pytest.mark.parametrize("newer", ["local", "mirror", "neither"])
def test_resume_with_a_mirror_reads_the_chosen_copy_once_and_never_the_other(
    s3, tmp_path, monkeypatch, newer
):
    updates = {"local": 2 if newer != "mirror" else 1, "mirror": 2 if newer != "local" else 1}
    run_dir, mirror = _two_copies(tmp_path, s3, updates)
    opened, hashed = _count_reads(monkeypatch)
    trainer = _Resumed()
    initializer = ResumeInitializer(run_dir, mirror=mirror)
    initializer.apply(trainer)
    chosen = initializer.chosen
    winner = "mirror" if newer == "mirror" else "local"  # on a tie the local copy
    loser = "local" if winner == "mirror" else "mirror"
    assert chosen.training_iteration.update == 2 and chosen.checksums_verified
    assert str(chosen.folder.location).startswith(s3.url if winner == "mirror" else str(tmp_path))
    members = set(chosen.manifest.files)
    assert {n: opened[winner][n] for n in members} == dict.fromkeys(members, 1)
    assert not [n for n in opened[loser] if n.endswith(".th")]  # the other copy's data never read
    assert not hashed  # verified from the bytes loaded, not by a separate pass
    assert trainer.state["training_iteration"]["update"] == 2  # the trainer file of that set


def test_a_damaged_newest_local_set_resumes_from_the_mirror_s_intact_copy_of_it(s3, tmp_path, caplog):
    import logging

    run_dir, mirror = _two_copies(tmp_path, s3, {"local": 2, "mirror": 2})
    victim = run_dir / "checkpoints" / "autoencoder.decoder_cp=latest_model.th"
    data = bytearray(victim.read_bytes())
    data[-40] ^= 1
    victim.write_bytes(bytes(data))
    trainer = _Resumed()
    initializer = ResumeInitializer(run_dir, mirror=mirror)
    with caplog.at_level(logging.INFO, logger="ksuit"):
        initializer.apply(trainer)
    assert str(initializer.chosen.folder.location).startswith(s3.url)
    assert initializer.chosen.training_iteration.update == 2
    assert trainer.state["training_iteration"]["update"] == 2  # the trainer file of that set
    # the same set as `select` takes, which checks every copy's checksums first
    assert initializer.select(trainer).folder.location == initializer.chosen.folder.location


def test_a_copy_that_falls_back_to_an_older_set_loses_to_a_copy_with_a_newer_intact_one(s3, tmp_path):
    run_dir, mirror = _two_copies(tmp_path, s3, {"mirror": 2})
    local_root = run_dir.parent
    model = Autoencoder(autoencoder_config()).initialize()
    counter = UpdateCounter(None, TrainingIteration(epoch=30), updates_per_epoch=20, effective_batch_size=4)
    with CheckpointWriter(PathProvider(local_root, "run"), counter) as writer:
        for tag in ("E0_U1_S4", "E0_U3_S12"):
            counter.next_update()
            if tag == "E0_U3_S12":
                counter.next_update()
            writer.save(model, tag, trainer=FakeTrainer(counter))
    newest = run_dir / "checkpoints" / "autoencoder.encoder_cp=E0_U3_S12_optim.th"
    data = bytearray(newest.read_bytes())
    data[-40] ^= 1
    newest.write_bytes(bytes(data))  # local promises update 3, but only update 1 is intact
    trainer = _Resumed()
    initializer = ResumeInitializer(run_dir, mirror=mirror)
    initializer.apply(trainer)
    assert str(initializer.chosen.folder.location).startswith(s3.url)
    assert initializer.chosen.training_iteration.update == 2
