"""Sharded checkpoint folders on S3 (moto over HTTP), written by one process through DCP (no
process group): staged under a folder key of the save, committed with the set's commit record
and head swap, read back through the head; a failed or abandoned save leaves nothing a reader
sees and recovery removes its parts; a committed folder whose part was removed or replaced is
refused by name; a part can only be written below a folder key of its own folder."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.readers import select_resume_set
from ksuit.readers.model_loading import load_payload
from ksuit.storage import CorruptCheckpointError, SetWriter, open_backend, read_manifest, verify_file
from ksuit.storage.backend import StagedFolder
from ksuit.storage.mirror import MirroringSetWriter
from ksuit.storage.objectstore.commit import ObjectSetTransaction
from ksuit.storage.sharded.consolidate import export_sharded
from ksuit.storage.sharded.load import load_full
from tests.conftest import assert_bitwise_equal
from tests.storage.sharded_sets import MODEL, OPTIM, TRAINER, optim_state, sharded_files, weights

MANIFEST = "m_cp=latest.manifest.json"


def folder_url(s3) -> str:
    return f"{s3.url}/runs/r/checkpoints"


def data_keys(s3) -> list[str]:
    return [k for k in s3.keys("runs/") if "/.ksuit/data/" in k]


def test_a_sharded_set_commits_to_s3_and_loads_back(s3):
    url = folder_url(s3)
    SetWriter(url).write(sharded_files(0), run_id="r")
    backend = open_backend(url)
    assert [e.name for e in backend.entries()] == [MANIFEST, TRAINER]  # folders are not files
    assert backend.folders() == [MODEL, OPTIM]
    parts = sorted(k.rsplit("/", 1)[-1] for k in data_keys(s3) if f"/{MODEL}/" in k)
    assert parts == [".metadata", "__0_0.distcp", "ksuit.th"]
    assert not [k for k in s3.keys("runs/") if k.startswith(f"runs/r/checkpoints/{MODEL}")]  # behind the head
    manifest = read_manifest(backend, MANIFEST)
    for name, entry in manifest.files.items():
        assert verify_file(backend, name, entry) is None, name
    assert_bitwise_equal(load_payload(f"{url}/{MODEL}"), weights(0))
    assert_bitwise_equal(load_full(backend.child(OPTIM)), optim_state(0))
    assert CliRunner().invoke(app, ["verify", f"{s3.url}/runs/r"]).exit_code == 0


def test_a_new_save_commits_new_folders_and_recovery_removes_the_old_parts(s3):
    url = folder_url(s3)
    SetWriter(url).write(sharded_files(0), run_id="r")
    first = set(data_keys(s3))
    SetWriter(url).write(sharded_files(1), run_id="r")
    assert first < set(data_keys(s3))  # a new save id: the committed folders were never written into
    backend = open_backend(url)
    assert_bitwise_equal(load_payload(f"{url}/{MODEL}"), weights(1))
    backend.repair(grace_seconds=0)  # the replaced folders' parts go with their retired folder keys
    assert not set(data_keys(s3)) & first
    assert_bitwise_equal(load_payload(f"{url}/{OPTIM}"), optim_state(1))
    assert not s3.uploads()


def test_a_failed_sharded_save_leaves_the_previous_set_and_removes_its_parts(s3, monkeypatch):
    url = folder_url(s3)
    SetWriter(url).write(sharded_files(0), run_id="r")
    before = set(data_keys(s3))

    def broken(*args, **kwargs):
        raise OSError(5, "failed after every part was written")

    monkeypatch.setattr("ksuit.storage.sets._updated_manifests", broken)
    with pytest.raises(OSError, match="after every part"):
        SetWriter(url).write(sharded_files(1), run_id="r")
    assert set(data_keys(s3)) == before
    assert_bitwise_equal(load_payload(f"{url}/{MODEL}"), weights(0))


def test_an_abandoned_sharded_save_is_invisible_and_verify_repair_removes_it(s3, monkeypatch):
    url = folder_url(s3)
    SetWriter(url).write(sharded_files(0), run_id="r")
    before = set(data_keys(s3))
    monkeypatch.setattr(ObjectSetTransaction, "discard", lambda self: None)  # as if killed

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ksuit.storage.sets._updated_manifests", killed)
    with pytest.raises(KeyboardInterrupt):
        SetWriter(url).write(sharded_files(1), run_id="r")
    monkeypatch.undo()
    leftovers = set(data_keys(s3)) - before
    assert any(k.endswith(f"{MODEL}/__0_0.distcp") for k in leftovers)
    assert open_backend(url).folders() == [MODEL, OPTIM]
    assert_bitwise_equal(load_payload(f"{url}/{MODEL}"), weights(0))
    chosen, skipped = select_resume_set(url, "m")
    assert chosen.tag == "latest" and not skipped
    report = open_backend(url).recover()  # young leftovers: a save may still be writing them
    assert set(data_keys(s3)) >= leftovers and report.kept
    result = CliRunner().invoke(app, ["verify", f"{s3.url}/runs/r", "--repair", "--grace", "0"])
    assert result.exit_code == 0, result.output
    assert set(data_keys(s3)) == before
    assert_bitwise_equal(load_payload(f"{url}/{MODEL}"), weights(0))


@pytest.mark.parametrize("damage", ["removed", "replaced"])
def test_a_committed_folder_with_a_damaged_part_is_refused_naming_the_part(s3, damage):
    url = folder_url(s3)
    SetWriter(url).write(sharded_files(0), run_id="r")
    key = next(k for k in data_keys(s3) if k.endswith(f"{MODEL}/__0_0.distcp"))
    if damage == "removed":
        s3.endpoint.client().delete_object(Bucket=s3.bucket, Key=key)
    else:
        data = bytearray(s3.get(key))
        data[-100] ^= 0xFF  # same size, other bytes
        s3.put(key, bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"__0_0\.distcp: (missing|checksum)"):
        load_payload(f"{url}/{MODEL}")
    result = CliRunner().invoke(app, ["verify", f"{s3.url}/runs/r"])
    assert result.exit_code != 0 and "__0_0.distcp" in result.output


def test_a_part_is_written_only_below_a_folder_key_of_its_folder(s3):
    backend = open_backend(folder_url(s3))
    write = lambda out: out.write(b"x")  # noqa: E731
    save = "1700000000-0123456789ab"
    for key in (
        "../other/x",
        f".ksuit/data/{save}/{OPTIM}",  # another folder's key
        f".ksuit/data/{save}/{TRAINER}",  # a file's key
        ".ksuit/HEAD.json",
        f".ksuit/data/{save}/../../{MODEL}",
        f"/{MODEL}",
    ):
        with pytest.raises(ValueError, match="not a staged sharded checkpoint folder"):
            backend.write_part(StagedFolder(MODEL, key), "__0_0.distcp", write)
    staged = StagedFolder(MODEL, f".ksuit/data/{save}/{MODEL}")
    for part in ("../x", "a/b", "..", ""):
        with pytest.raises(ValueError, match="not a part name"):
            backend.write_part(staged, part, write)
    backend.write_part(staged, "__0_0.distcp", write)
    with pytest.raises(FileExistsError, match="written once"):
        backend.write_part(staged, "__0_0.distcp", write)
    assert [k for k in s3.keys()] == [f"runs/r/checkpoints/.ksuit/data/{save}/{MODEL}/__0_0.distcp"]


def test_a_sharded_folder_exports_from_s3(s3, tmp_path):
    url = folder_url(s3)
    SetWriter(url).write(sharded_files(0), run_id="r")
    export_sharded(open_backend(url).child(MODEL), "torch", open_backend(tmp_path), "m.th")
    assert_bitwise_equal(
        torch.load(tmp_path / "m.th", weights_only=True)["state_dict"], weights(0)["state_dict"]
    )


def test_a_local_sharded_set_is_mirrored_to_s3_as_folders(s3, tmp_path):
    mirror = f"{s3.url}/mirror/r/checkpoints"
    writer = MirroringSetWriter(tmp_path / "r" / "checkpoints", mirror, first_delay=0.01)
    writer.write(sharded_files(0), run_id="r")
    writer.write(sharded_files(1), run_id="r")
    writer.close()
    assert not writer.failures, writer.failures
    remote = open_backend(mirror)
    assert remote.folders() == [MODEL, OPTIM]
    for name, entry in read_manifest(remote, MANIFEST).files.items():
        assert verify_file(remote, name, entry) is None, name
    assert_bitwise_equal(load_payload(f"{mirror}/{MODEL}"), weights(1))
    assert_bitwise_equal(load_payload(f"{mirror}/{OPTIM}"), optim_state(1))
