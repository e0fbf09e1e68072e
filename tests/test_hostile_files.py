"""Hostile checkpoint files, each built from scratch: every reader refuses them with
`CorruptCheckpointError` or `UnsafeCheckpointError` naming the file, before `torch.load` runs
(so nothing is allocated for them), and legitimate files of every kind still load."""

from __future__ import annotations

import collections
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from ksuit.storage import CorruptCheckpointError, UnsafeCheckpointError, load_file, loading, read_metadata
from ksuit.storage.formats import TorchFormat
from tests import hostile as h
from tests.conftest import assert_bitwise_equal

GOOD_PKL = h.tensor_pickle(2, 2)
GOOD = h.torch_zip(GOOD_PKL, {"data/0": bytes(8)})

# (id, file bytes, error type, pattern in the message)
TORCH_CASES = [
    ("reference DAG bomb", h.torch_zip(h.dag_bomb(60)), UnsafeCheckpointError, "reference bomb"),
    ("bytearray(1.5 GiB)", h.torch_zip(h.bytearray_bomb()), UnsafeCheckpointError, "builtins.bytearray"),
    ("reference cycle", h.torch_zip(h.cycle()), UnsafeCheckpointError, "contains itself"),
    ("5000 levels deep", h.torch_zip(h.deep_nesting()), UnsafeCheckpointError, "levels deep"),
    ("os.system", h.torch_zip(h.code_call()), UnsafeCheckpointError, "os.system"),
    (
        "compressed data.pkl",
        h.torch_zip(GOOD_PKL, {"data/0": bytes(8)}, deflate=("data.pkl",)),
        UnsafeCheckpointError,
        "compressed",
    ),
    (
        "record larger than the archive",
        h.patch_central_entry(GOOD, "data/0", size=1 << 30),
        CorruptCheckpointError,
        "more than the archive",
    ),
    (
        "overlapping records",
        h.patch_central_entry(
            h.torch_zip(GOOD_PKL, {"data/0": bytes(8), "data/1": bytes(8)}),
            "data/1",
            offset=h.local_offset(GOOD, "data/0"),
        ),
        CorruptCheckpointError,
        "overlaps",
    ),
    (
        "storage larger than its record",
        h.torch_zip(h.tensor_pickle(1000, 2), {"data/0": bytes(8)}),
        CorruptCheckpointError,
        "needs 4000 bytes",
    ),
    ("storage without a record", h.torch_zip(GOOD_PKL), CorruptCheckpointError, "has no record"),
    (
        "tensor past its storage",
        h.torch_zip(h.tensor_pickle(2, 1000), {"data/0": bytes(8)}),
        UnsafeCheckpointError,
        "reaches past its storage",
    ),
    ("random bytes", h.random_bytes(), CorruptCheckpointError, "not a checkpoint"),
    ("empty file", b"", CorruptCheckpointError, "not a checkpoint"),
    ("truncated zip", GOOD[: len(GOOD) // 2], CorruptCheckpointError, "truncated or corrupt"),
    (
        "no data.pkl",
        h.torch_zip(None, {"data/0": bytes(8)}),
        CorruptCheckpointError,
        "no data.pkl",
    ),
    ("truncated pickle", h.torch_zip(GOOD_PKL[:-10], {"data/0": bytes(8)}), CorruptCheckpointError, "pickle"),
]


@pytest.fixture
def no_torch_load(monkeypatch):
    """Fails the test if torch.load is reached: refusals must come before anything is unpickled."""

    def boom(*args, **kwargs):
        raise AssertionError("torch.load was called on a hostile file")

    monkeypatch.setattr(torch, "load", boom)


@pytest.mark.parametrize(("data", "exc", "pattern"), [pytest.param(*c[1:], id=c[0]) for c in TORCH_CASES])
def test_hostile_torch_files_are_refused_before_torch_load(tmp_path, no_torch_load, data, exc, pattern):
    path = tmp_path / "x_cp=latest_model.th"
    path.write_bytes(data)
    for read in (load_file, read_metadata, lambda p: load_file(p, mmap=True)):
        with pytest.raises(exc, match=pattern) as info:
            read(path)
        assert str(path) in str(info.value)
        assert "\n" not in str(info.value)


def test_hostile_files_are_small(tmp_path):
    """The files above are tiny: what they would cost comes from trusting them, not their size."""
    sizes = {c[0]: len(c[1]) for c in TORCH_CASES}
    assert sizes["reference DAG bomb"] < 2500 and sizes["bytearray(1.5 GiB)"] < 600


def test_a_deflate_bomb_is_refused_before_inflating(tmp_path, no_torch_load):
    path = tmp_path / "bomb.th"
    path.write_bytes(h.deflate_bomb_zip(64 << 20))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(UnsafeCheckpointError, match="record 'archive/data/0' is compressed"):
        load_file(path)


def test_an_oversized_data_pkl_is_refused_unread(tmp_path, monkeypatch, no_torch_load):
    from ksuit.storage import torch_archive

    monkeypatch.setattr(torch_archive, "MAX_PICKLE_BYTES", 100)
    path = tmp_path / "big.th"
    path.write_bytes(GOOD)
    with pytest.raises(UnsafeCheckpointError, match="data.pkl is .* bytes, more than the 100 bytes"):
        load_file(path)


def test_the_legacy_torch_format_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "legacy.th"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CorruptCheckpointError, match="legacy .* save it again with a current torch.save"):
        load_file(path)


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo_cp=latest_model.th"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeCheckpointError, match="is a FIFO, not a regular file"):
        h.call_with_deadline(lambda: load_file(fifo), fifos=(fifo,))
    with pytest.raises(UnsafeCheckpointError, match="character device"):
        load_file("/dev/zero")
    link = tmp_path / "link_cp=latest_model.th"
    (tmp_path / "real.th").write_bytes(GOOD)
    link.symlink_to(tmp_path / "real.th")
    assert torch.equal(load_file(link)["w"], torch.zeros(2))  # an explicit path may be a link
    with pytest.raises(UnsafeCheckpointError, match="symbolic link"):
        load_file(link, follow_symlinks=False)  # a run folder's file may not


# --- safetensors ------------------------------------------------------------------------------

F32_2 = bytes(8)
SAFETENSORS_CASES = [
    (
        "metadata replaces state_dict",
        h.safetensors_bytes({**h.good_tensor_header(), "__metadata__": {"state_dict": "{}"}}, F32_2),
        "'state_dict' entry",
    ),
    ("header is a list", h.safetensors_bytes([1, 2], F32_2), "not an object"),
    ("shape is a string", h.safetensors_bytes(h.good_tensor_header(shape="2"), F32_2), "shape"),
    ("negative dimension", h.safetensors_bytes(h.good_tensor_header(shape=[-2]), F32_2), "shape"),
    ("bool dimension", h.safetensors_bytes(h.good_tensor_header(shape=[True, 2]), F32_2), "shape"),
    ("unknown dtype", h.safetensors_bytes(h.good_tensor_header(dtype="X9"), F32_2), "unknown dtype"),
    (
        "offsets past the file",
        h.safetensors_bytes(h.good_tensor_header(data_offsets=[0, 800]), F32_2),
        "data_offsets",
    ),
    (
        "offsets not a pair",
        h.safetensors_bytes(h.good_tensor_header(data_offsets=[0]), F32_2),
        "data_offsets",
    ),
    (
        "overlapping tensors",
        h.safetensors_bytes(
            {**h.good_tensor_header(), "v": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, F32_2 * 2
        ),
        "overlaps",
    ),
    ("tensor entry not an object", h.safetensors_bytes({"w": [1]}, F32_2), "not an object"),
    (
        "metadata not strings",
        h.safetensors_bytes({**h.good_tensor_header(), "__metadata__": {"a": 1}}, F32_2),
        "__metadata__",
    ),
    (
        "metadata a list",
        h.safetensors_bytes({**h.good_tensor_header(), "__metadata__": [1]}, F32_2),
        "__metadata__",
    ),
    (
        "deeply nested metadata value",
        h.safetensors_bytes(
            {
                **h.good_tensor_header(),
                "__metadata__": {"a": "[" * 100000 + "]" * 100000, "ksuit.json_keys": '["a"]'},
            },
            F32_2,
        ),
        "metadata is damaged",
    ),
    (
        "deeply nested header",
        h.safetensors_bytes(None, F32_2, raw_header=b'{"x":' + b"[" * 100000 + b"]" * 100000 + b"}"),
        "not JSON",
    ),
    ("header not UTF-8", h.safetensors_bytes(None, F32_2, raw_header=b'{"\xff": 1}'), "not JSON"),
    ("header longer than the file", struct.pack("<Q", 1000) + b"{}", "does not fit"),
    ("7 bytes", b"\x01" * 7, "too short"),
    (
        "marker not a list",
        h.safetensors_bytes({**h.good_tensor_header(), "__metadata__": {"ksuit.json_keys": "5"}}, F32_2),
        "not a list",
    ),
]


@pytest.mark.parametrize(("data", "pattern"), [pytest.param(*c[1:], id=c[0]) for c in SAFETENSORS_CASES])
def test_hostile_safetensors_headers_are_corrupt(tmp_path, data, pattern):
    path = tmp_path / "x_cp=latest_model.safetensors"
    path.write_bytes(data)
    for read in (load_file, read_metadata):
        with pytest.raises(CorruptCheckpointError, match=pattern) as info:
            read(path)
        assert str(path) in str(info.value)


def test_safetensors_metadata_never_replaces_the_tensors(tmp_path):
    path = tmp_path / "x.safetensors"
    header = {
        **h.good_tensor_header(),
        "__metadata__": {"state_dict": '{"w": 1}', "ksuit.json_keys": '["state_dict"]'},
    }
    path.write_bytes(h.safetensors_bytes(header, F32_2))
    with pytest.raises(CorruptCheckpointError, match="would replace its tensors"):
        load_file(path)


# --- legitimate files --------------------------------------------------------------------------


def every_kind_of_payload() -> dict:
    """What ksuit saves: state dicts, optimizer states with int keys, RNG states, nested values."""
    base = torch.arange(12, dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {
        "state_dict": model.state_dict(),  # OrderedDict with _metadata
        "optim": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "list": [1, (2, 3.5), [None, True]]},
        "dtypes": {
            str(d): torch.ones(3, dtype=d)
            for d in (
                torch.bfloat16,
                torch.float16,
                torch.int64,
                torch.bool,
                torch.complex64,
                torch.uint8,
                torch.int8,
                torch.float64,
            )
        },
        "new_dtypes": [torch.zeros(2, dtype=torch.uint16), torch.zeros(2, dtype=torch.float8_e4m3fn)],
        "scalar": torch.tensor(3.0),
        "views": (base[2:5], base.view(3, 4), base.view(3, 4).t()),
        "empty": torch.zeros(0, 3),
        "size": torch.Size([2, 3]),
        "dtype": torch.float32,
        "device": torch.device("cpu"),
        "plain": {
            "bytes": b"\x00\xff",
            "bytearray": bytearray(b"ab"),
            "set": {1, 2},
            "complex": 1 + 2j,
            "big": 10**30,
            "neg": -7,
        },
        "ordered": collections.OrderedDict(b=1, a=2),
        "parameter": torch.nn.Parameter(torch.ones(2)),
    }


def _ksuit_write(payload, path) -> None:
    with path.open("wb") as f:
        TorchFormat().write(payload, f)


def writers():
    from torch.utils.serialization import config

    def torch_save(payload, path, alignment):
        with config.patch({"save.storage_alignment": alignment}):
            torch.save(payload, path)

    return {
        "torch.save": lambda p, path: torch.save(p, path),
        "torch.save unaligned": lambda p, path: torch_save(p, path, 1),
        "ksuit": lambda p, path: _ksuit_write(p, path),
    }


@pytest.mark.parametrize("writer", ["torch.save", "torch.save unaligned", "ksuit"])
@pytest.mark.parametrize("mmap", [False, True])
def test_every_legitimate_payload_still_loads(tmp_path, writer, mmap):
    payload = every_kind_of_payload()
    path = tmp_path / "ok.th"
    writers()[writer](payload, path)
    loaded = load_file(path, mmap=mmap)
    assert_bitwise_equal(
        {k: v for k, v in loaded.items() if k != "plain"}, {k: v for k, v in payload.items() if k != "plain"}
    )
    assert loaded["plain"] == payload["plain"]
    assert loaded["views"][0].untyped_storage().data_ptr() == loaded["views"][1].untyped_storage().data_ptr()
    meta = read_metadata(path)
    assert meta["scalar"] == {"shape": [], "dtype": "float32", "nbytes": 4}


def test_zip64_records_and_offsets_pass_the_checks(tmp_path):
    """Files past 4 GiB use zip64 sizes and offsets: the same records, repacked with zip64 extra
    fields on every entry, pass the checks and load."""
    payload = every_kind_of_payload()
    plain, path = tmp_path / "plain.th", tmp_path / "z64.th"
    torch.save(payload, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            with src.open(info) as r, dst.open(info.filename, "w", force_zip64=True) as w:
                w.write(r.read())
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():  # each local header carries a zip64 extra field (id 0x0001)
            name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
            assert raw[info.header_offset + 30 + name_len : info.header_offset + 32 + name_len] == b"\x01\x00"
    assert_bitwise_equal(load_file(path)["state_dict"], payload["state_dict"])


def test_read_metadata_bounds_what_it_describes(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "MAX_DESCRIBED_VALUES", 50)
    path = tmp_path / "many.th"
    torch.save({"values": list(range(1000)), "text": "x" * 50_000}, path)
    meta = read_metadata(path)
    assert len(meta["values"]) == 49 and meta["values"][-1] == "<952 more values not shown>"
    assert len(meta["text"]) < 11_000 and meta["text"].endswith("(40000 more characters not shown)")


@pytest.mark.slow
def test_memory_bombs_are_refused_under_a_small_address_space(tmp_path):
    """In a process allowed only ~300 MB more address space than it has after importing torch,
    the bytearray bomb and a DEFLATE bomb are refused (not a MemoryError, not a crash)."""
    (tmp_path / "bytearray.th").write_bytes(h.torch_zip(h.bytearray_bomb()))
    (tmp_path / "deflate.th").write_bytes(h.deflate_bomb_zip(512 << 20))
    script = textwrap.dedent(
        f"""
        import resource, sys
        import torch
        from ksuit.storage import load_file, read_metadata, UnsafeCheckpointError
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (300 << 20), resource.RLIM_INFINITY))
        for name in ("bytearray.th", "deflate.th"):
            for read in (load_file, read_metadata):
                try:
                    read({str(tmp_path)!r} + "/" + name)
                except UnsafeCheckpointError as e:
                    print("refused", name, e)
        """
    )
    import ksuit

    src = Path(ksuit.__file__).resolve().parents[1]  # the ksuit under test, in the child too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    refused = [line for line in proc.stdout.splitlines() if line.startswith("refused ")]
    assert len(refused) == 4, proc.stdout + proc.stderr
