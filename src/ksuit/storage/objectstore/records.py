"""The head and the commit records of an object-store checkpoint folder, and the grammar of the
keys under `.ksuit/` (the protocol is in `ksuit.storage.objectstore`).

Both are JSON and untrusted when read: at most `MAX_RECORD_BYTES`, every field validated with
strict types, every set a manifest name of the layout grammar, every file a plain file name,
and every object key exactly `.ksuit/data/<save id>/<that file name>`, so a record can only
ever point at data objects of its own folder. Anything else is a `CorruptCheckpointError`
naming the object. A sharded checkpoint folder (`..._model.dcp`) is one such key too, the
prefix of its part objects `.ksuit/data/<save id>/<folder name>/<part name>` (part names of
the layout grammar).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ksuit.layout import is_part_filename, is_plain_filename, is_sharded_filename, parse_manifest_filename
from ksuit.storage.errors import CorruptCheckpointError

PRIVATE = ".ksuit"
HEAD_KEY = f"{PRIVATE}/HEAD.json"
DATA_PREFIX = f"{PRIVATE}/data/"
COMMITS_PREFIX = f"{PRIVATE}/commits/"
MAX_RECORD_BYTES = 64 << 20
HEAD_FORMAT = "ksuit.objectstore.head"
COMMIT_FORMAT = "ksuit.objectstore.commit"
VERSION = 1
_SAVE_ID = r"[0-9]{10}-[0-9a-f]{12}"
SAVE_ID_RE = re.compile(_SAVE_ID)
_DATA_KEY_RE = re.compile(re.escape(DATA_PREFIX) + r"(?P<save>" + _SAVE_ID + r")/(?P<name>[^/\\]+)")
_PART_KEY_RE = re.compile(
    re.escape(DATA_PREFIX) + r"(?P<save>" + _SAVE_ID + r")/(?P<folder>[^/\\]+)/(?P<part>[^/\\]+)"
)
_COMMIT_KEY_RE = re.compile(re.escape(COMMITS_PREFIX) + r"(?P<save>" + _SAVE_ID + r")\.json")


def new_save_id(server_time: float) -> str:
    """`<seconds, 10 digits>-<12 random hex digits>`: names a save and says when it started."""
    return f"{int(server_time):010d}-{secrets.token_hex(6)}"


def save_time(save_id: str) -> int:
    return int(save_id.split("-", 1)[0])


def data_key(save_id: str, name: str) -> str:
    return f"{DATA_PREFIX}{save_id}/{name}"


def commit_key(save_id: str) -> str:
    return f"{COMMITS_PREFIX}{save_id}.json"


def part_key(folder_key: str, part: str) -> str:
    """The key of the part `part` of the sharded checkpoint folder staged at `folder_key`."""
    return f"{folder_key}/{part}"


def is_folder_key(key: str) -> bool:
    """Whether `key` is the data key of a sharded checkpoint folder (the prefix of its parts)."""
    match = _DATA_KEY_RE.fullmatch(key)
    return match is not None and is_sharded_filename(match["name"])


def folder_of(key: str) -> str | None:
    """The folder key a part key of a sharded checkpoint folder lies in, or None."""
    match = _PART_KEY_RE.fullmatch(key)
    if match is None or not is_sharded_filename(match["folder"]) or not is_part_filename(match["part"]):
        return None
    return data_key(match["save"], match["folder"])


def parse_private_key(key: str) -> tuple[str, str] | None:
    """`(kind, save id)` of a key under `.ksuit/` that ksuit writes ("data", "commit", "head"),
    or None for anything else."""
    if key == HEAD_KEY:
        return ("head", "")
    match = _DATA_KEY_RE.fullmatch(key)
    if match is not None and is_plain_filename(match["name"]):
        return ("data", match["save"])
    folder = folder_of(key)
    if folder is not None:
        return ("data", ObjectRef(folder, 0).save)
    match = _COMMIT_KEY_RE.fullmatch(key)
    return ("commit", match["save"]) if match is not None else None


@dataclass(frozen=True)
class ObjectRef:
    """Where the bytes of one file are (`key`, relative to the folder) and how many there are."""

    key: str
    size: int

    @property
    def save(self) -> str:
        return self.key[len(DATA_PREFIX) :].split("/", 1)[0]


@dataclass
class SetRecord:
    """One set of a save: its manifest (the JSON the layout's readers parse) and its objects."""

    manifest: str
    objects: dict[str, ObjectRef]


@dataclass
class CommitRecord:
    """What one save committed: its sets and standalone files (`loose`)."""

    save: str
    sequence: int
    owner: str
    run_id: str | None = None
    sets: dict[str, SetRecord] = field(default_factory=dict)
    loose: dict[str, ObjectRef] = field(default_factory=dict)

    def keys(self) -> set[str]:
        """Every data object the record names."""
        refs = [r for s in self.sets.values() for r in s.objects.values()] + list(self.loose.values())
        return {r.key for r in refs}

    def to_json(self) -> bytes:
        data = {
            "format": COMMIT_FORMAT,
            "version": VERSION,
            "save": self.save,
            "sequence": self.sequence,
            "owner": self.owner,
            "run_id": self.run_id,
            "sets": {
                m: {"manifest": s.manifest, "objects": {n: _ref(r) for n, r in s.objects.items()}}
                for m, s in self.sets.items()
            },
            "loose": {n: _ref(r) for n, r in self.loose.items()},
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str) -> CommitRecord:
        schema = _parse(_CommitSchema, raw, source, "commit record")
        record = cls(
            save=schema.save,
            sequence=schema.sequence,
            owner=schema.owner,
            run_id=schema.run_id,
            sets={
                m: SetRecord(s.manifest, {n: ObjectRef(r.key, r.size) for n, r in s.objects.items()})
                for m, s in schema.sets.items()
            },
            loose={n: ObjectRef(r.key, r.size) for n, r in schema.loose.items()},
        )
        for name, set_record in record.sets.items():
            if parse_manifest_filename(name) is None:
                raise _invalid(source, "commit record", f"{name[:200]!r} is not a manifest name")
            for file_name, ref in set_record.objects.items():
                _check_ref(file_name, ref, source)
        for file_name, ref in record.loose.items():
            _check_ref(file_name, ref, source)
        return record


@dataclass
class Head:
    """The folder's committed state: each set -> the save that holds it (see the protocol)."""

    sequence: int = 0
    owner: str | None = None
    run_id: str | None = None
    write: str | None = None  # the write that produced this version (a save id or a token)
    sets: dict[str, str] = field(default_factory=dict)
    loose: dict[str, str] = field(default_factory=dict)
    retired: dict[str, int] = field(default_factory=dict)  # data/commit key -> second retired
    collected_before: int = 0  # saves that started before this second may have been collected

    def saves(self) -> set[str]:
        return set(self.sets.values()) | set(self.loose.values())

    def copy(self) -> Head:
        return Head(
            self.sequence,
            self.owner,
            self.run_id,
            self.write,
            dict(self.sets),
            dict(self.loose),
            dict(self.retired),
            self.collected_before,
        )

    def to_json(self) -> bytes:
        data = {
            "format": HEAD_FORMAT,
            "version": VERSION,
            "sequence": self.sequence,
            "owner": self.owner,
            "run_id": self.run_id,
            "write": self.write,
            "sets": self.sets,
            "loose": self.loose,
            "retired": self.retired,
            "collected_before": self.collected_before,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str) -> Head:
        schema = _parse(_HeadSchema, raw, source, "head")
        for name in schema.sets:
            if parse_manifest_filename(name) is None:
                raise _invalid(source, "head", f"{name[:200]!r} is not a manifest name")
        for name in schema.loose:
            if not is_plain_filename(name):
                raise _invalid(source, "head", f"{name[:200]!r} is not a plain file name")
        for key in schema.retired:
            if parse_private_key(key) is None or key == HEAD_KEY:
                raise _invalid(
                    source, "head", f"retired key {key[:200]!r} is not a data object or commit record"
                )
        return cls(
            schema.sequence,
            schema.owner,
            schema.run_id,
            schema.write,
            dict(schema.sets),
            dict(schema.loose),
            dict(schema.retired),
            schema.collected_before,
        )


def _ref(ref: ObjectRef) -> dict[str, Any]:
    return {"key": ref.key, "size": ref.size}


def _check_ref(name: str, ref: ObjectRef, source: str) -> None:
    """A file points at a data object of this folder: its own, or (two names of one save sharing
    their bytes) another plain file name's with the same extension, the format's. A sharded
    checkpoint folder points at its own folder key, and only a folder does."""
    match = _DATA_KEY_RE.fullmatch(ref.key)
    if (
        not is_plain_filename(name)
        or match is None
        or not is_plain_filename(match["name"])
        or match["name"].rsplit(".", 1)[-1] != name.rsplit(".", 1)[-1]
        or ((is_sharded_filename(name) or is_sharded_filename(match["name"])) and match["name"] != name)
    ):
        raise _invalid(
            source,
            "commit record",
            f"file {name[:200]!r} points at {ref.key[:200]!r}, not at its own data object",
        )


_STRICT = ConfigDict(strict=True, extra="ignore")
_Count = Annotated[int, Field(ge=0)]
_SaveId = Annotated[str, Field(pattern=f"^{_SAVE_ID}$")]
_Text = Annotated[str, Field(max_length=1000)]


class _RefSchema(BaseModel):
    model_config = _STRICT
    key: Annotated[str, Field(max_length=2000)]
    size: _Count


class _SetSchema(BaseModel):
    model_config = _STRICT
    manifest: Annotated[str, Field(max_length=16 << 20)]
    objects: dict[str, _RefSchema]


class _CommitSchema(BaseModel):
    model_config = _STRICT
    format: Annotated[str, Field(pattern=f"^{re.escape(COMMIT_FORMAT)}$")]
    version: Annotated[int, Field(ge=1, le=VERSION)]
    save: _SaveId
    sequence: _Count
    owner: _Text
    run_id: _Text | None = None
    sets: dict[str, _SetSchema]
    loose: dict[str, _RefSchema] = {}


class _HeadSchema(BaseModel):
    model_config = _STRICT
    format: Annotated[str, Field(pattern=f"^{re.escape(HEAD_FORMAT)}$")]
    version: Annotated[int, Field(ge=1, le=VERSION)]
    sequence: _Count
    owner: _Text | None = None
    run_id: _Text | None = None
    write: _Text | None = None
    sets: dict[str, _SaveId]
    loose: dict[str, _SaveId] = {}
    retired: dict[str, _Count] = {}
    collected_before: _Count = 0


def _parse(schema: type[Any], raw: bytes, source: str, what: str) -> Any:
    try:
        data = pydantic_core.from_json(raw)
    except ValueError as e:
        raise _invalid(source, what, f"not JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("version"), int) and data["version"] > VERSION:
        raise CorruptCheckpointError(
            f"{source} is a {what} of version {data['version']}; this ksuit reads up to {VERSION}: "
            "upgrade ksuit"
        )
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)[:3]
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])[:200]}: {err['msg']}" for err in errors)
        raise _invalid(source, what, problems or "not a JSON object") from None


def _invalid(source: str, what: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{source} is not a valid ksuit {what} ({problem}); the checkpoint sets of this folder cannot be "
        "resolved through it: restore it from a backup or a versioned bucket, or copy the sets elsewhere"
    )
