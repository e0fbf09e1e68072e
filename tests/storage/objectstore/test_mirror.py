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
