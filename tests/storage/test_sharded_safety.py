"""A sharded checkpoint folder is untrusted like any file: its `.metadata` pickle is scanned
against DCP's allowlist before anything is built, non-tensor items (pickled bytes) are refused
by name, every chunk archive and the skeleton are checked like `.th` files, and chunks must
cover their tensor exactly. Nothing a crafted file names ever runs."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from ksuit.storage import UnsafeCheckpointError, open_backend
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.sharded.load import load_full
from ksuit.storage.sharded.payload import join_payload, split_payload
from ksuit.storage.sharded.verify import check_folder, describe
from tests.conftest import assert_bitwise_equal
from tests.storage.sharded_sets import MODEL, optim_state, weights, write_sharded_set


class Exploit:
    """Unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def folder(tmp_path):
    write_sharded_set(tmp_path / "run")
    return open_backend(tmp_path / "run").child(MODEL)


def test_payload_split_and_join_are_inverse():
    for payload in (weights(), optim_state()):
        skeleton, tensors, paths = split_payload(payload)
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())
        assert "net.0.weight" in tensors or "state.0.exp_avg" in tensors  # readable DCP keys
        pickle.dumps(skeleton)  # plain values only
        assert_bitwise_equal(join_payload(skeleton, paths, tensors), payload)
    assert join_payload(*split_payload(optim_state())[::2], split_payload(optim_state())[1])["param_groups"][
        0
    ]["betas"] == (0.9, 0.99)


def test_plain_dcp_reads_a_ksuit_folder(folder):
    target = {k: torch.empty_like(v) for k, v in weights()["state_dict"].items()}
    dcp.load(target, checkpoint_id=folder.location, no_dist=True)
    assert_bitwise_equal(target, weights()["state_dict"])


def test_a_metadata_pickle_that_would_run_code_is_refused_by_name(folder, tmp_path):
    marker = tmp_path / "pwned"
    with open(os.path.join(folder.location, ".metadata"), "wb") as f:
        pickle.dump(Exploit(marker), f)
    for read in (load_full, describe):
        with pytest.raises(UnsafeCheckpointError, match=r"\.metadata.*posix\.system.*not on the allowlist"):
            read(folder)
    assert any(".metadata" in p and "posix.system" in p for p in check_folder(folder))
    assert not marker.exists()


def test_a_non_tensor_item_is_refused_by_name_and_its_bytes_never_loaded(folder, tmp_path):
    marker = tmp_path / "pwned"
    # what plain DCP writes for a non-tensor value: pickled bytes it would load with weights_only=False
    plain = tmp_path / "plain"
    dcp.save({"net.0.weight": torch.ones(2), "evil": Exploit(marker)}, checkpoint_id=plain, no_dist=True)
    assert not marker.exists()
    for name in (".metadata", "__0_0.distcp"):
        os.replace(plain / name, os.path.join(folder.location, name))
    with pytest.raises(UnsafeCheckpointError, match="non-tensor item 'evil'"):
        load_full(folder)
    assert not marker.exists()


def craft(folder, chunks: list[tuple[tuple, tuple]], size=(4, 2), data: bytes | None = None) -> None:
    """Replaces the folder's metadata by one tensor 'net.0.weight' of `size` with `chunks`
    (offsets, sizes), each stored as `data` (default: a real chunk of ones) in one part."""
    part = io.BytesIO()
    storage = {}
    md_chunks = []
    for offsets, sizes in chunks:
        start = part.tell()
        if data is None:
            torch.save(torch.ones(sizes), part)
        else:
            part.write(data)
        storage[MetadataIndex("net.0.weight", offsets)] = _StorageInfo(
            "__0_0.distcp", start, part.tell() - start
        )
        md_chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
    item = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(size), md_chunks)
    metadata = Metadata({"net.0.weight": item}, storage_data=storage)
    path = folder.location
    with open(os.path.join(path, "__0_0.distcp"), "wb") as f:
        f.write(part.getvalue())
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    skeleton = torch.load(os.path.join(path, "ksuit.th"), weights_only=True)
    skeleton["payload"]["state_dict"] = {"net.0.weight": None}
    skeleton["tensors"] = {"net.0.weight": ["state_dict", "net.0.weight"]}
    torch.save(skeleton, os.path.join(path, "ksuit.th"))


def test_a_crafted_folder_of_real_dcp_classes_loads(folder):
    craft(folder, [((0, 0), (2, 2)), ((2, 0), (2, 2))])
    assert torch.equal(load_full(folder)["state_dict"]["net.0.weight"], torch.ones(4, 2))
    assert check_folder(folder) == []


@pytest.mark.parametrize(
    "chunks, problem",
    [
        ([((0, 0), (2, 2))], "hold 4 of its 8 elements"),
        ([((0, 0), (3, 2)), ((2, 0), (2, 2))], "overlap"),
        ([((0, 0), (3, 2)), ((2, 0), (1, 2))], "overlap"),  # the sizes add up, yet row 3 is missing
        ([((0, 0), (2, 2)), ((3, 0), (2, 2))], "reaches past the tensor"),
    ],
)
def test_chunks_must_cover_their_tensor_exactly(folder, chunks, problem):
    craft(folder, chunks)
    with pytest.raises(CorruptCheckpointError, match=problem):
        load_full(folder)
    assert any(problem in p for p in check_folder(folder))


def test_a_chunk_archive_that_would_run_code_is_refused(folder, tmp_path):
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save(Exploit(marker), evil)
    craft(folder, [((0, 0), (4, 2))], data=evil.getvalue())
    with pytest.raises(UnsafeCheckpointError, match=r"a chunk of 'net.0.weight'.*posix\.system"):
        load_full(folder)
    assert any("posix.system" in p for p in check_folder(folder))
    assert not marker.exists()


def test_a_skeleton_that_would_run_code_is_refused(folder, tmp_path):
    marker = tmp_path / "pwned"
    torch.save(Exploit(marker), os.path.join(folder.location, "ksuit.th"))
    with pytest.raises(UnsafeCheckpointError, match=r"ksuit\.th"):
        load_full(folder)
    assert not marker.exists()
