"""The object-store backend against a real S3 endpoint (moto over HTTP) and `memory://`: what
readers see, what the store holds, and the commit protocol's steps."""

from __future__ import annotations

import io
import json
import secrets
import threading

import pytest
import torch

import ksuit
from ksuit.providers import PathProvider
from ksuit.readers import list_checkpoints, scan_sets, select_resume_set
from ksuit.storage import (
    ConcurrentWriterError,
    CorruptCheckpointError,
    PendingFile,
    SetWriter,
    UnsafeCheckpointError,
    load_file,
    open_backend,
)
from ksuit.storage.manifest import read_manifest
from ksuit.storage.objectstore.records import HEAD_KEY, CommitRecord, Head
from ksuit.storage.objectstore.stores import PreconditionFailed
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.writers import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import FakeTrainer, assert_bitwise_equal, autoencoder_config, train_one_step

ITERATION = {"epoch": 0, "update": 1, "sample": 4}


@pytest.fixture(params=["s3", "memory"])
def root(request) -> str:
    """An output root on S3 (moto) or in memory, empty."""
    if request.param == "s3":
        return request.getfixturevalue("s3").url + "/runs"
    return f"memory://ksuit-tests-{secrets.token_hex(6)}/runs"


def counter() -> UpdateCounter:
    return UpdateCounter(None, TrainingIteration(epoch=30), updates_per_epoch=20, effective_batch_size=4)


def save_model(root: str, run_id: str = "run", **kwargs) -> tuple[Autoencoder, PathProvider]:
    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    pp = PathProvider(root, run_id)
    uc = counter()
    uc.next_update()
    with CheckpointWriter(pp, uc, **kwargs) as writer:
        writer.save(
            model, "E0_U1_S0", trainer=FakeTrainer(uc), save_latest_weights=True, save_latest_optim=True
        )
    return model, pp


def pending(value: float, tag: str = "latest", group: str = "m", role: str = "model") -> PendingFile:
    payload = {"state_dict": {"w": torch.full((4,), value)}}
    return PendingFile(f"{group}_cp={tag}_{role}.th", payload, "torch", role, group, tag, ITERATION)


def test_a_url_run_saves_lists_loads_and_resumes_like_a_local_one(root):
    model, pp = save_model(root)
    assert pp.checkpoint_path == f"{root}/run/checkpoints"
    names = {c.name for c in list_checkpoints(pp.run_output_path)}
    assert "autoencoder.encoder_cp=latest_model.th" in names and "autoencoder_cp=E0_U1_S0_trainer.th" in names
    loaded = ksuit.load_model(f"{pp.checkpoint_path}/autoencoder.encoder_cp=latest_model.th")
    assert_bitwise_equal(loaded.state_dict(), model.encoder.state_dict())
    sets = scan_sets(pp.run_output_path, checksum=True)
    assert sets and all(s.ok for s in sets), [(s.tag, s.problems) for s in sets]
    chosen, skipped = select_resume_set(pp.run_output_path, "autoencoder")
    assert chosen.tag == "latest" and skipped == []


def test_every_th_object_in_the_bucket_loads_with_plain_torch_load(s3):
    save_model(s3.url + "/runs")
    keys = s3.keys("runs/")
    th = [k for k in keys if k.endswith(".th")]
    objects = {r.key for r in open_backend(s3.url + "/runs/run/checkpoints").view().files.values()}
    assert len(th) == len(objects) == 7  # 10 files: both tags share their optimizer and trainer objects
    for key in th:
        torch.load(io.BytesIO(s3.get(key)), weights_only=True)
    # readers use the layout's names; the store keeps the bytes under names unique to each save
    assert not [k for k in keys if k.startswith("runs/run/checkpoints/autoencoder")]
    assert all(k.startswith("runs/run/checkpoints/.ksuit/") for k in keys)


def test_a_save_is_one_commit_record_and_one_head_swap_for_all_its_sets(root):
    """The trainer's batch (the model's latest and the EMA's latest) becomes visible at once."""
    backend = open_backend(f"{root}/run/checkpoints")
    SetWriter(backend).write([pending(1.0), pending(2.0, group="m_ema=0.9")], run_id="run")
    head = backend.read_head().head
    assert head is not None
    assert set(head.sets) == {"m_cp=latest.manifest.json", "m_ema=0.9_cp=latest.manifest.json"}
    assert len(set(head.sets.values())) == 1  # both sets point at one save
    (record,) = backend.records(set(head.sets.values())).values()
    assert set(record.sets) == set(head.sets)


def test_a_failed_save_leaves_nothing_visible_and_removes_what_it_staged(s3):
    backend = open_backend(s3.url + "/run/checkpoints")
    writer = SetWriter(backend)
    writer.write([pending(1.0)], run_id="run")
    before = s3.keys()

    class Boom(Exception):
        pass

    def explode(out):
        out.write(b"x" * 1000)
        raise Boom

    with (
        pytest.raises(Boom),
        backend.begin_set({"m_cp=latest_model.th": "m_cp=latest.manifest.json"}, 0) as txn,
    ):
        txn.stage("m_cp=latest_optim.th", lambda out: out.write(b"y" * 100), 100)
        txn.stage("m_cp=latest_model.th", explode, 1000)
    assert s3.keys() == before and s3.uploads() == []
    assert load_file(s3.url + "/run/checkpoints/m_cp=latest_model.th")["state_dict"]["w"][0] == 1.0


def test_readers_never_see_objects_no_head_names_and_repair_removes_them(s3):
    backend = open_backend(s3.url + "/run/checkpoints")
    SetWriter(backend).write([pending(1.0)], run_id="run")
    # what a save killed before its commit leaves: a data object and a commit record, no head entry
    s3.put("run/checkpoints/.ksuit/data/0000000001-aaaaaaaaaaaa/m_cp=latest_model.th", b"torn")
    s3.put("run/checkpoints/.ksuit/commits/0000000001-aaaaaaaaaaaa.json", b"{}")
    client = s3.endpoint.client()
    upload = client.create_multipart_upload(
        Bucket=s3.bucket, Key="run/checkpoints/.ksuit/data/0000000001-aaaaaaaaaaaa/m_cp=latest_optim.th"
    )
    assert {e.name for e in backend.entries()} == {"m_cp=latest.manifest.json", "m_cp=latest_model.th"}
    assert backend.recover().removed_temps  # the default grace: those saves started in 1970
    assert not [k for k in s3.keys() if "aaaaaaaaaaaa" in k]
    assert s3.uploads() == []
    with pytest.raises(client.exceptions.NoSuchUpload):
        client.list_parts(Bucket=s3.bucket, Key="x", UploadId=upload["UploadId"])


def test_young_leftovers_are_kept_by_recovery_and_removed_by_repair(s3):
    backend = open_backend(s3.url + "/run/checkpoints")
    SetWriter(backend).write([pending(1.0)], run_id="run")
    head = backend.read_head(fresh=True)
    young = f"{int(head.server_time):010d}-bbbbbbbbbbbb"
    s3.put(f"run/checkpoints/.ksuit/data/{young}/m_cp=latest_model.th", b"in flight")
    report = backend.recover()
    assert report.removed_temps == [] and len(report.kept) == 1
    report = backend.repair(0)
    assert [r.rsplit("/", 2)[-2] for r in report.removed_temps] == [young]


def test_a_set_rewritten_in_part_keeps_the_objects_of_the_files_it_did_not_rewrite(root):
    backend = open_backend(f"{root}/run/checkpoints")
    writer = SetWriter(backend)
    writer.write([pending(1.0), pending(5.0, role="optim")], run_id="run")
    writer.write([pending(2.0)], run_id="run")
    manifest = read_manifest(backend, "m_cp=latest.manifest.json")
    assert set(manifest.files) == {"m_cp=latest_model.th", "m_cp=latest_optim.th"}
    assert load_file(f"{root}/run/checkpoints/m_cp=latest_optim.th")["state_dict"]["w"][0] == 5.0
    assert load_file(f"{root}/run/checkpoints/m_cp=latest_model.th")["state_dict"]["w"][0] == 2.0
    assert all(s.ok for s in scan_sets(backend, checksum=True))


def test_replaced_objects_stay_readable_for_the_reader_grace_then_go(s3):
    url = s3.url + "/run/checkpoints"
    SetWriter(open_backend(url)).write([pending(1.0)], run_id="run")
    reader = open_backend(url)
    with reader.lock():  # one head for the whole block
        SetWriter(open_backend(url)).write([pending(2.0)], run_id="run")
        with reader.open("m_cp=latest_model.th") as f:
            assert torch.load(f.stream(), weights_only=True)["state_dict"]["w"][0] == 1.0
    assert load_file(url + "/m_cp=latest_model.th")["state_dict"]["w"][0] == 2.0
    head = reader.read_head(fresh=True).head
    assert len(head.retired) == 2  # the old model object and the commit record that held it
    quick = open_backend(url, {"ksuit_reader_grace": 0})
    SetWriter(quick).write([pending(3.0)], run_id="run")
    assert len([k for k in s3.keys() if "/data/" in k]) == 1  # no reader can need the rest any more


def test_delete_set_hides_the_set_first_then_its_objects_go(root):
    backend = open_backend(f"{root}/run/checkpoints", {"ksuit_reader_grace": 0})
    writer = SetWriter(backend)
    writer.write([pending(1.0, tag="E0_U1_S4"), pending(1.0)], run_id="run")
    backend.delete_set("m_cp=E0_U1_S4.manifest.json", ["m_cp=E0_U1_S4_model.th"])
    assert {e.name for e in backend.entries()} == {"m_cp=latest.manifest.json", "m_cp=latest_model.th"}
    writer.write([pending(2.0)], run_id="run")  # the next swap removes retired objects
    report = backend.repair(0)
    assert report.problems == [] and report.kept == []
    head = backend.read_head(fresh=True).head
    assert head.retired == {}


def test_deleting_a_file_of_a_committed_set_alone_is_refused(root):
    backend = open_backend(f"{root}/run/checkpoints")
    SetWriter(backend).write([pending(1.0)], run_id="run")
    with pytest.raises(ValueError, match="delete a set as a whole"):
        backend.delete(["m_cp=latest_model.th"])
    backend.delete(["m_cp=latest.manifest.json"])
    assert backend.entries() == []


def test_standalone_files_are_plain_objects_beside_the_sets(s3):
    backend = open_backend(s3.url + "/run")
    written = backend.write_file("config.yaml", lambda out: out.write(b"a: 1\n"), 5)
    assert written.location == s3.url + "/run/config.yaml"
    assert s3.get("run/config.yaml") == b"a: 1\n"
    assert backend.read_small("config.yaml", 100, "config") == b"a: 1\n"
    with pytest.raises(UnsafeCheckpointError, match="more than the 3 bytes"):
        backend.read_small("config.yaml", 3, "config")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        backend.read_small("nope.yaml", 100, "config")


def test_conditional_writes_are_enforced_by_the_store(s3):
    """What the protocol relies on: a create-only PUT and a compare-and-swap PUT (If-None-Match,
    If-Match) that the endpoint itself refuses when their condition does not hold."""
    store = open_backend(s3.url + "/x").store
    path = f"{s3.bucket}/x/object.json"
    first = store.put(path, b"1", create_only=True)
    with pytest.raises(PreconditionFailed):
        store.put(path, b"2", create_only=True)
    second = store.put(path, b"2", if_match=first.etag)
    with pytest.raises(PreconditionFailed):
        store.put(path, b"3", if_match=first.etag)
    assert store.get(path, 10).data == b"2"
    assert store.get(path, 10, if_none_match=second.etag).not_modified


def test_a_second_writer_is_refused_once_the_first_took_over_the_run(root):
    """A job still running after it was preempted and restarted (a zombie) cannot interleave."""
    url = f"{root}/run/checkpoints"
    zombie = SetWriter(open_backend(url))
    zombie.backend._owner = "zombie host pid 1"
    zombie.write([pending(1.0)], run_id="run")
    restarted = SetWriter(open_backend(url))
    restarted.backend._owner = "new host pid 2"
    restarted.write([pending(2.0)], run_id="run")  # the restarted job takes over
    with pytest.raises(
        ConcurrentWriterError, match=r"another writer \(new host pid 2\) committed to run run"
    ):
        zombie.write([pending(3.0)], run_id="run")
    assert load_file(url + "/m_cp=latest_model.th")["state_dict"]["w"][0] == 2.0


def test_a_save_racing_another_writer_fails_at_its_commit_and_leaves_the_winner(root):
    url = f"{root}/run/checkpoints"
    SetWriter(open_backend(url)).write([pending(0.0)], run_id="run")
    a, b = open_backend(url), open_backend(url)
    a._owner, b._owner = "writer A", "writer B"
    with a.begin_set({"m_cp=latest_model.th": "m_cp=latest.manifest.json"}, 0) as txn_a:
        written = txn_a.stage("m_cp=latest_model.th", lambda out: torch.save({"w": 1}, out), 0)
        SetWriter(b).write([pending(2.0)], run_id="run")  # B commits while A is staging
        manifest = {
            "group": "m",
            "tag": "latest",
            "files": {written.name: {"size": written.size, "checksum": written.checksum}},
        }
        with pytest.raises(ConcurrentWriterError, match="writer B"):
            txn_a.commit([("m_cp=latest.manifest.json", json.dumps(manifest).encode())], 10**19)
    assert load_file(url + "/m_cp=latest_model.th")["state_dict"]["w"][0] == 2.0
    assert open_backend(url).read_head(fresh=True).head.owner == "writer B"


def test_a_damaged_head_names_itself(s3):
    url = s3.url + "/run/checkpoints"
    SetWriter(open_backend(url)).write([pending(1.0)], run_id="run")
    s3.put(f"run/checkpoints/{HEAD_KEY}", b'{"format": "something else"}')
    with pytest.raises(CorruptCheckpointError, match=r"HEAD\.json is not a valid ksuit head"):
        list_checkpoints(s3.url + "/run")


def test_a_commit_record_cannot_point_outside_its_folder(s3):
    url = s3.url + "/run/checkpoints"
    backend = open_backend(url)
    SetWriter(backend).write([pending(1.0)], run_id="run")
    head = backend.read_head(fresh=True).head
    (save,) = head.sets.values()
    key = f"run/checkpoints/.ksuit/commits/{save}.json"
    raw = json.loads(s3.get(key))
    raw["sets"]["m_cp=latest.manifest.json"]["objects"]["m_cp=latest_model.th"]["key"] = "../../../other/x.th"
    with pytest.raises(CorruptCheckpointError, match="not at its own data object"):
        CommitRecord.from_json(json.dumps(raw).encode(), "record")
    # a head naming a save whose record is gone
    bad = Head(sets={"m_cp=latest.manifest.json": "0000000002-cccccccccccc"})
    s3.put(f"run/checkpoints/{HEAD_KEY}", bad.to_json())
    with pytest.raises(CorruptCheckpointError, match="commit record .* is missing"):
        open_backend(url).entries()


def test_s3_without_s3fs_says_what_to_install(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from ksuit.storage import open_backend\n"
        "try:\n    open_backend('s3://bucket/runs')\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'ksuit[s3]'" in out.stdout, out.stdout + out.stderr


def test_an_oversized_head_is_refused_naming_it(root):
    backend = open_backend(f"{root}/run/checkpoints")
    SetWriter(backend).write([pending(1.0)], run_id="run")
    import ksuit.storage.objectstore.backend as objectstore_backend

    limit = objectstore_backend.MAX_RECORD_BYTES
    objectstore_backend.MAX_RECORD_BYTES = 10
    objectstore_backend._HEADS.clear()  # a head read before was checked then: this process reads it anew
    try:
        with pytest.raises(
            UnsafeCheckpointError, match=r"HEAD\.json: it is .* more than the 10 bytes a head"
        ):
            open_backend(f"{root}/run/checkpoints").entries()
    finally:
        objectstore_backend.MAX_RECORD_BYTES = limit


def test_a_hash_and_a_load_of_one_opened_object_download_it_once(monkeypatch):
    """`load_model` and resume hash a file in a helper thread while they load it: on an object
    store both ask for the same download, which happens once (the other waits for it)."""
    _, pp = save_model(f"memory://ksuit-tests-{secrets.token_hex(6)}/runs")
    backend = open_backend(pp.checkpoint_path)
    opened = backend.open("autoencoder.encoder_cp=latest_model.th")
    store = opened.store
    downloads: list[str] = []
    first_started, release = threading.Event(), threading.Event()
    download = store.download

    def counted(path, out, size):
        downloads.append(path)
        first_started.set()
        assert release.wait(30), "the test never released the first download"
        return download(path, out, size)

    monkeypatch.setattr(store, "download", counted)
    results: dict[str, object] = {}
    hasher = threading.Thread(target=lambda: results.update(hash=opened.checksum()))
    hasher.start()
    assert first_started.wait(30)
    loader = threading.Thread(target=lambda: results.update(path=opened.local_path()))
    loader.start()
    loader.join(timeout=1.0)  # it waits for the first download (or, wrongly, starts its own)
    release.set()
    hasher.join(30)
    loader.join(30)
    assert len(downloads) == 1, downloads
    with open(results["path"], "rb") as f:
        assert len(f.read()) == opened.size
    assert results["hash"][0] == opened.size
    opened.close()
