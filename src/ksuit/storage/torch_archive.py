"""Checks of a torch zip checkpoint before `torch.load` sees it (the read side of `torch_zip`).

`torch.load(weights_only=True)` runs no foreign code, but it trusts sizes: a zip record that
inflates to gigabytes, records that overlap (each read into its own copy), a storage that
claims more bytes than its record holds, or an allowed call such as `bytearray(1_500_000_000)`
all cost memory before anything fails. `check_torch_archive` therefore reads only the zip's
directory and `data.pkl` (bounded) and refuses, naming the file:

- anything that is not a zip archive: `CorruptCheckpointError` ("not a checkpoint"), with a
  hint for the legacy pre-1.6 torch format;
- compressed or encrypted records (torch.save and ksuit write every record STORED), records
  that reach past the archive or overlap, a missing or oversized `data.pkl`;
- a `data.pkl` that `ksuit.storage.safe_pickle` refuses under `TORCH_POLICY`: the allowlist of
  what torch.save writes for dense tensors, storages, OrderedDict, torch.Size, dtypes, devices
  and plain values (str, int, float, bool, None, bytes, bytearray, complex, set, lists,
  tuples, dicts), with argument checks on each call, and bounds on opcodes and nesting;
- storages larger than their record, and tensors that reach past their storage.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

from ksuit.storage.backend import OpenedFile
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.safe_pickle import (
    GlobalRule,
    Node,
    PicklePolicy,
    global_name,
    is_int,
    items_of,
    object_name,
    scan_pickle,
)

MAX_PICKLE_BYTES = 64 << 20
HINT = (
    "; ksuit loads only what torch.save writes for tensors and plain Python values "
    "(weights_only=True). If you wrote this file yourself and trust it, load it with "
    "torch.load(..., weights_only=False) and re-save the plain state"
)
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ENCODINGS = {"latin1", "latin-1", "utf-8", "utf8", "ascii"}


def _dtype_names() -> dict[str, torch.dtype]:
    return {str(v): v for v in vars(torch).values() if isinstance(v, torch.dtype)}


DTYPES = _dtype_names()
# the typed storage classes torch.save names (one per classic dtype), with their item sizes;
# newer dtypes are saved as an UntypedStorage (bytes) plus a dtype
_TYPED_STORAGES = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
    "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8,
}  # fmt: skip
STORAGE_ITEMSIZE: dict[str, int] = {f"torch.{name}Storage": size for name, size in _TYPED_STORAGES.items()}
STORAGE_ITEMSIZE.update({"torch.UntypedStorage": 1, "torch.storage.UntypedStorage": 1})


# --- argument checks of the allowed calls (symbolic values, see safe_pickle) ------------------


def _ints(value: Any, what: str) -> list[int] | str:
    """The ints of a symbolic tuple (or list) of at most 64 non-negative ints, else a problem."""
    items = items_of(value)
    if items is None:
        items = items_of(value, "list")
    if items is None or len(items) > 64 or not all(type(i) is int and i >= 0 for i in items):
        return f"a {what} that is not a tuple of at most 64 ints >= 0"
    return items


def _hooks(value: Any) -> bool:
    return object_name(value) == "collections.OrderedDict" or items_of(value, "dict") is not None


def _storage_numel(value: Any) -> tuple[int, int] | None:
    """`(numel, itemsize)` of a storage persistent id, or None."""
    if not (isinstance(value, Node) and value.kind == "persistent"):
        return None
    items = items_of(value.children[0]) or []
    name = global_name(items[1])
    return (items[4], STORAGE_ITEMSIZE[name]) if name is not None else None


def _check_tensor(args: tuple[Any, ...], dtype_index: int | None) -> str | None:
    n = 6 if dtype_index is None else 7
    if len(args) not in (n, n + 1):
        return f"{len(args)} arguments"
    storage = _storage_numel(args[0])
    if storage is None:
        return "a storage that is not a persistent storage id"
    offset, size, stride = args[1], _ints(args[2], "size"), _ints(args[3], "stride")
    for problem in (size, stride):
        if isinstance(problem, str):
            return problem
    if not is_int(offset) or offset < 0 or len(size) != len(stride):
        return "an offset, size and stride that do not fit together"
    if not isinstance(args[4], bool) or not _hooks(args[5]):
        return "a requires_grad or backward_hooks argument of the wrong type"
    itemsize = storage[1]
    if dtype_index is not None:
        name = global_name(args[dtype_index])
        if name not in DTYPES:
            return "a dtype that is not a torch dtype"
        itemsize = DTYPES[name].itemsize
    if len(args) == n + 1 and args[n] is not None and items_of(args[n], "dict") is None:
        return "metadata that is not a dict"
    if 0 not in size:
        assert isinstance(size, list) and isinstance(stride, list)  # not problem strings, checked above
        end = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True)) + 1
        numel, storage_itemsize = storage
        if end * itemsize > numel * storage_itemsize or end >= 1 << 62:
            return f"a tensor of size {tuple(size)} that reaches past its storage of {numel} elements"
    return None


def _check_parameter(args: tuple[Any, ...]) -> str | None:
    if len(args) != 3 or object_name(args[0]) not in _TENSOR_BUILDERS or not isinstance(args[1], bool):
        return "arguments that are not (tensor, requires_grad, hooks)"
    return None if _hooks(args[2]) else "backward_hooks of the wrong type"


def _check_text_args(args: tuple[Any, ...]) -> str | None:
    ok = len(args) == 2 and all(isinstance(a, str) for a in args) and args[1].lower() in _ENCODINGS
    return None if ok else "arguments that are not (str, encoding)"


def _check_bytearray(args: tuple[Any, ...]) -> str | None:
    # bytearray(_codecs.encode(text, "latin1")) as pickle writes it; never an int: bytearray(n)
    # allocates n bytes
    if args == () or (
        len(args) == 1 and (isinstance(args[0], bytes) or object_name(args[0]) == "_codecs.encode")
    ):
        return None
    return _check_text_args(args)


def _check_complex(args: tuple[Any, ...]) -> str | None:
    ok = len(args) <= 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    return None if ok else "arguments that are not numbers"


def _check_sequence_arg(args: tuple[Any, ...]) -> str | None:
    ok = args == () or (len(args) == 1 and items_of(args[0], "list") is not None)
    return None if ok else "arguments that are not a list"


def _check_size(args: tuple[Any, ...]) -> str | None:
    if len(args) != 1:
        return f"{len(args)} arguments"
    dims = _ints(args[0], "size")
    return dims if isinstance(dims, str) else None


def _check_device(args: tuple[Any, ...]) -> str | None:
    ok = (
        1 <= len(args) <= 2
        and isinstance(args[0], str)
        and len(args[0]) <= 32
        and (len(args) == 1 or (is_int(args[1]) and 0 <= args[1] < 1 << 16))
    )
    return None if ok else "arguments that are not (device type, index)"


_TENSOR_BUILDERS = ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3")


def _check_storage_id(pid: Any) -> str | None:
    items = items_of(pid)
    if (
        items is None
        or len(items) != 5
        or items[0] != "storage"
        or global_name(items[1]) not in STORAGE_ITEMSIZE
        or not isinstance(items[2], str)
        or not 0 < len(items[2]) <= 256
        or not isinstance(items[3], str)
        or len(items[3]) > 64
        or not is_int(items[4])
        or items[4] < 0
    ):
        return "that is not ('storage', <storage type>, key, location, numel)"
    return None


def _torch_globals() -> dict[str, GlobalRule]:
    rules = {name: GlobalRule() for name in DTYPES}  # referred to, never called
    rules.update({name: GlobalRule() for name in STORAGE_ITEMSIZE})
    rules.update(
        {
            "torch._utils._rebuild_tensor_v2": GlobalRule(
                call=True, leaf=True, check_args=lambda a: _check_tensor(a, None)
            ),
            "torch._utils._rebuild_tensor_v3": GlobalRule(
                call=True, leaf=True, check_args=lambda a: _check_tensor(a, 6)
            ),
            "torch._utils._rebuild_parameter": GlobalRule(call=True, leaf=True, check_args=_check_parameter),
            "collections.OrderedDict": GlobalRule(
                call=True, build=True, mapping=True, check_args=_check_sequence_arg
            ),
            "builtins.set": GlobalRule(call=True, check_args=_check_sequence_arg),
            "builtins.complex": GlobalRule(call=True, leaf=True, check_args=_check_complex),
            "builtins.bytearray": GlobalRule(call=True, leaf=True, check_args=_check_bytearray),
            "_codecs.encode": GlobalRule(call=True, leaf=True, check_args=_check_text_args),
            "torch.Size": GlobalRule(call=True, check_args=_check_size),
            "torch.device": GlobalRule(call=True, leaf=True, check_args=_check_device),
        }
    )
    return rules


TORCH_POLICY = PicklePolicy(
    globals=_torch_globals(),
    max_bytes=MAX_PICKLE_BYTES,
    max_protocol=2,  # what torch.save writes and weights_only reads
    max_ops=8_000_000,  # the scan keeps ~150 bytes per opcode: at most ~1.2 GB for any data.pkl
    persistent_id=_check_storage_id,
    hint=HINT,
)


# --- the zip directory -----------------------------------------------------------------------


@dataclass(frozen=True)
class ZipRecord:
    name: str
    header_offset: int
    size: int


def _corrupt(path: str, problem: str) -> CorruptCheckpointError:
    """A damaged archive: `problem` says what; the fix is another checkpoint."""
    return CorruptCheckpointError(
        f"cannot read {path}: the file is truncated or corrupt ({problem}); "
        "run `ksuit verify` on the run folder and resume from another checkpoint"
    )


def _not_a_zip(path: str, head: bytes) -> CorruptCheckpointError:
    if head.startswith(_LEGACY_MAGIC):
        return CorruptCheckpointError(
            f"cannot read {path}: it is in torch's legacy (pre-1.6) format, which ksuit does not read; "
            "load it with torch.load(..., weights_only=True) and save it again with a current torch.save"
        )
    if head.startswith(b"PK\x03\x04"):
        return _corrupt(path, "a zip archive without its end")
    what = "it is empty" if not head else "it is not a zip archive"
    return CorruptCheckpointError(
        f"cannot read {path}: not a checkpoint ({what}; torch checkpoints are zip archives): "
        "pass a .th file written by ksuit or torch.save"
    )


def read_zip_directory(f: OpenedFile) -> dict[str, ZipRecord]:
    """`{name: record}` of a STORED zip archive, checked: no compressed or encrypted record, no
    record past the archive, no two records overlapping or sharing a name. Only the zip's
    directory is read (by `zipfile`); no record is inflated."""
    path = f.location
    head = f.read_at(0, 16)
    try:
        with f.stream() as raw, zipfile.ZipFile(raw) as archive:
            infos = archive.infolist()
            cd_offset = archive.start_dir
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OverflowError, EOFError, struct.error) as e:
        if not head.startswith(b"PK"):
            raise _not_a_zip(path, head) from None
        raise _corrupt(path, f"its zip directory is damaged ({str(e)[:100]})") from None
    records: dict[str, ZipRecord] = {}
    for info in infos:
        name = info.filename
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: its record {name!r} is "
                f"{'encrypted' if info.flag_bits & 1 else 'compressed'}; torch.save and ksuit write every "
                "record uncompressed, and inflating records of unknown size can exhaust memory. Re-save "
                "the file with torch.save"
            )
        size = info.file_size
        if info.compress_size != size or info.header_offset + 30 + len(name.encode()) + size > cd_offset:
            raise _corrupt(path, f"its record {name!r} claims {size} bytes, more than the archive holds")
        if name in records:
            raise _corrupt(path, f"its record {name!r} appears twice")
        records[name] = ZipRecord(name, info.header_offset, size)
    previous_end = 0
    for record in sorted(records.values(), key=lambda r: r.header_offset):
        if record.header_offset < previous_end:
            raise _corrupt(path, f"its record {record.name!r} overlaps another record")
        previous_end = record.header_offset + 30 + len(record.name.encode()) + record.size
    return records


def _record_bytes(f: OpenedFile, record: ZipRecord) -> bytes:
    path = f.location
    header = f.read_at(record.header_offset, 30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise _corrupt(path, f"the local header of {record.name!r} is damaged")
    method, nlen, elen = struct.unpack_from("<H", header, 8)[0], *struct.unpack_from("<HH", header, 26)
    if method != 0:
        raise _corrupt(path, f"the local header of {record.name!r} disagrees with the zip directory")
    start = record.header_offset + 30 + nlen + elen
    if start + record.size > f.size:
        raise _corrupt(path, f"record {record.name!r} reaches past the archive")
    data = f.read_at(start, record.size) if record.size else b""
    if len(data) != record.size:
        raise _corrupt(path, f"record {record.name!r} is truncated")
    return data


def check_torch_archive(f: OpenedFile) -> None:
    """Refuses (see the module docstring) what `torch.load(weights_only=True)` should not see."""
    path = f.location
    records = read_zip_directory(f)
    if not records:
        raise _corrupt(path, "its zip archive is empty")
    prefix = next(iter(records)).split("/", 1)[0]
    if any(not name.startswith(prefix + "/") for name in records):
        raise _corrupt(path, "its records are not in one archive folder, as torch.save writes them")
    data_pkl = records.get(f"{prefix}/data.pkl")
    if data_pkl is None:
        raise _corrupt(path, "it has no data.pkl record")
    if data_pkl.size > MAX_PICKLE_BYTES:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its data.pkl is {data_pkl.size} bytes, more than the "
            f"{MAX_PICKLE_BYTES} bytes allowed{HINT}"
        )
    result = scan_pickle(_record_bytes(f, data_pkl), TORCH_POLICY, path)
    for _, storage_type, key, _, numel in result.persistent_ids:
        record = records.get(f"{prefix}/data/{key}")
        nbytes = numel * STORAGE_ITEMSIZE[storage_type]
        if record is None or record.size < nbytes:
            have = "no record" if record is None else f"a record of {record.size} bytes"
            raise _corrupt(path, f"storage {key!r} needs {nbytes} bytes but has {have}")
