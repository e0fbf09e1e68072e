"""The checkpoint file-name grammar, in both directions, and name/tag validation.

    <name>[_<info>]_cp=<tag>_<role>.<ext>      a checkpoint file (role: model | optim | trainer)
    <name>[_<info>]_cp=<tag>_<role>.dcp/       a sharded checkpoint: a folder (ksuit.storage.sharded)
    <name>[_<info>]_cp=<tag>.manifest.json     the manifest of one set (see ksuit.storage)
    .<final name>.<token>.tmp                  a file being written (token: 8 hex digits)
    .ksuit-journal.<seq>.json                  a set switch or set delete in progress (seq: its sequence)
    ksuit-pins.json                            the tags `ksuit pin` protects from retention
    <any plain name>.ckpt                      another framework's checkpoint that ksuit writes in
                                               a set of its own (Lightning's), a "foreign" file
    ksuit.manifest.json                        a folder manifest: the files of a folder another
                                               framework wrote (a Hugging Face checkpoint-<n>)

`<name>` is a model name (`autoencoder.encoder` for a submodel), `<info>` optional
`key=value` parts such as `ema=0.999`, `<tag>` a progress tag (`E10_U200_S800`), `latest`,
`last` or a free string such as `best_model.loss.val`. Writers format names here and readers
parse them here; nothing else builds or splits file names.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from ksuit.utils.training import TrainingIteration

ROLES = ("model", "optim", "trainer")
EXTENSIONS = {"torch": "th", "safetensors": "safetensors", "dcp": "dcp"}
SHARDED_FORMAT = "dcp"  # a folder of torch.distributed.checkpoint shards, one per rank
LATEST = "latest"
LAST = "last"
MANIFEST_SUFFIX = ".manifest.json"
# checkpoint files of other frameworks that ksuit writes under its own manifests (Lightning's .ckpt)
FOREIGN_EXTENSIONS = (".ckpt",)
FOLDER_MANIFEST = "ksuit.manifest.json"
TEMP_SUFFIX = ".tmp"
JOURNAL_PREFIX = ".ksuit-journal."
PINS_FILENAME = "ksuit-pins.json"  # not a checkpoint: no `_cp=`, never `.th` or `.manifest.json`

# one `_<key>=<value>` part of `<info>`; a value never holds '_', so parts split on it
_INFO_KEY = r"[A-Za-z][A-Za-z0-9.\-]*"
_INFO_PART = _INFO_KEY + r"=[^_/\\]*"
# matched with fullmatch: `$` would also match before a trailing newline
_FILE_RE = re.compile(
    r"(?P<name>[^/\\]+?)(?P<info>(?:_" + _INFO_PART + r")*)_cp=(?P<tag>[^/\\]+)"
    r"_(?P<role>model|optim|trainer)\.(?P<ext>th|safetensors|dcp)"
)
_MANIFEST_RE = re.compile(
    r"(?P<name>[^/\\]+?)(?P<info>(?:_" + _INFO_PART + r")*)_cp=(?P<tag>[^/\\]+)" + re.escape(MANIFEST_SUFFIX)
)
# a name ending in `_<key>=<value>` would be read back as a shorter name plus info
_NAME_WITH_INFO_TAIL = re.compile(r".+_" + _INFO_PART)
_INFO_RE = re.compile(_INFO_PART + r"(?:_" + _INFO_PART + r")*")
# control characters (C0, DEL, C1), invisible format characters (e.g. bidi overrides), lone
# surrogates (undecodable bytes) and line separators: a name reaches terminals through `ls`
_UNPRINTABLE_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")


def _unprintable(value: str) -> list[str]:
    return sorted({c for c in value if unicodedata.category(c) in _UNPRINTABLE_CATEGORIES})


def _check_component(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__} ({value!r})")
    if value == "":
        raise ValueError(f"{what} must not be empty")
    bad = [c for c in ("/", "\\") if c in value]
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(f"{what} {value!r} contains {shown}; use a plain name without path separators")
    unprintable = _unprintable(value)
    if unprintable:
        shown = ", ".join(repr(c) for c in unprintable)
        raise ValueError(
            f"{what} {value!r} contains control or invisible characters ({shown}); "
            "use printable characters only"
        )
    if ".." in value:
        raise ValueError(f"{what} {value!r} contains '..'; use a plain name")
    if value.startswith("."):
        raise ValueError(f"{what} {value!r} starts with '.'; such names are reserved for temporary files")
    return value


def validate_name(name: object, what: str = "model name", in_file_names: bool = True) -> str:
    """A model/run name: no path separators, control characters or '..', no '_cp=', not starting
    with '.'.

    With `in_file_names` (model names), also nothing the file-name grammar would read back
    differently: a name ending in `_<key>=<value>` (such as `enc_v=2`) would be parsed as the
    name `enc` with info `v=2`. Run and stage names are folder names and may hold such parts.
    """
    name = _check_component(name, what)
    if "_cp=" in name:
        raise ValueError(f"{what} {name!r} contains '_cp=', which separates name and tag in file names")
    if in_file_names and _NAME_WITH_INFO_TAIL.fullmatch(name):
        head, tail = name.rsplit("_", 1)
        raise ValueError(
            f"{what} {name!r} ends in '_{tail}', which file names use for info parts such as "
            f"'_ema=0.999', so it would be read back as {head!r}; use another separator "
            f"(e.g. {head + '-' + tail.replace('=', '')!r})"
        )
    return name


def validate_tag(tag: object) -> str:
    """A checkpoint tag such as `E10_U200_S800`, `latest` or `best_model.loss.val`."""
    tag = _check_component(tag, "checkpoint tag")
    if tag.endswith(MANIFEST_SUFFIX) or tag.endswith(TEMP_SUFFIX):
        raise ValueError(f"checkpoint tag {tag!r} ends in a reserved suffix")
    if "_cp=" in tag:
        raise ValueError(
            f"checkpoint tag {tag!r} contains '_cp=', which separates name and tag in file names"
        )
    return tag


def validate_output_name(output_name: object) -> str:
    """A file name inside the checkpoint folder; must not escape it or look like a temp file."""
    name = _check_component(output_name, "output_name")
    if name.endswith(TEMP_SUFFIX) or name.endswith(MANIFEST_SUFFIX):
        raise ValueError(f"output_name {name!r} ends in a suffix reserved for ksuit's own files")
    return name


def format_info(info: dict[str, object] | None) -> str:
    """The `<info>` part of a file name: `{'ema': 0.999}` as `ema=0.999` (several joined by
    '_'); refuses keys and values the grammar could not read back."""
    if not info:
        return ""
    parts = []
    for key, value in info.items():
        if not isinstance(key, str) or not re.fullmatch(_INFO_KEY, key) or key == "cp":
            raise ValueError(
                f"info key {key!r} must start with a letter and hold only letters, digits, '.', '-' "
                "(and not be 'cp')"
            )
        text = str(value)
        if any(c in text for c in "_/\\") or ".." in text or _unprintable(text):
            raise ValueError(
                f"info value {text!r} for {key!r} must not contain '_', '/', '\\', '..' or control characters"
            )
        parts.append(f"{key}={text}")
    return "_".join(parts)


@dataclass(frozen=True)
class CheckpointName:
    """The parts of a checkpoint file name."""

    name: str
    tag: str
    role: str
    info: str = ""
    ext: str = "th"

    @property
    def group(self) -> str:
        """`<name>[_<info>]`: the files one save writes under one manifest share it."""
        return f"{self.name}_{self.info}" if self.info else self.name

    @property
    def filename(self) -> str:
        return f"{self.group}_cp={self.tag}_{self.role}.{self.ext}"

    @property
    def format(self) -> str:
        return {"safetensors": "safetensors", "dcp": SHARDED_FORMAT}.get(self.ext, "torch")

    @property
    def is_sharded(self) -> bool:
        """A folder of per-rank shards (`.dcp`), not a single file."""
        return self.ext == EXTENSIONS[SHARDED_FORMAT]

    @property
    def training_iteration(self) -> TrainingIteration | None:
        """The iteration encoded in a progress tag; None for `latest`, `last`, `best_...`."""
        if TrainingIteration.is_progress_string(self.tag):
            return TrainingIteration.from_string(self.tag)
        return None


def checkpoint_filename(name: str, tag: str, role: str, info: str = "", fmt: str = "torch") -> str:
    """`<name>[_<info>]_cp=<tag>_<role>.<ext>`, validating every part; the name always parses
    back into the same parts."""
    validate_name(name)
    validate_tag(tag)
    if role not in ROLES:
        raise ValueError(f"unknown checkpoint file role {role!r}; known: {', '.join(ROLES)}")
    if fmt not in EXTENSIONS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(EXTENSIONS)}")
    if info and (not isinstance(info, str) or _INFO_RE.fullmatch(info) is None or _unprintable(info)):
        raise ValueError(
            f"info {info!r} is not of the form 'key=value[_key=value...]'; build it with format_info"
        )
    parts = CheckpointName(name, tag, role, info, EXTENSIONS[fmt])
    if parse_checkpoint_filename(parts.filename) != parts:  # the grammar's promise, checked
        raise ValueError(
            f"{name!r}, {tag!r} and {info!r} would not be read back from a file name; rename them"
        )
    return parts.filename


def parse_checkpoint_filename(filename: str) -> CheckpointName | None:
    """The parts of a checkpoint file name, or None if it is not one."""
    match = _FILE_RE.fullmatch(filename)
    if match is None:
        return None
    return CheckpointName(
        name=match["name"],
        tag=match["tag"],
        role=match["role"],
        info=match["info"].lstrip("_"),
        ext=match["ext"],
    )


def is_sharded_filename(name: object) -> bool:
    """A checkpoint name of a sharded checkpoint: a folder `..._<role>.dcp`."""
    parsed = parse_checkpoint_filename(name) if isinstance(name, str) else None
    return parsed is not None and parsed.is_sharded


_PART_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


def is_part_filename(name: object) -> bool:
    """A file name inside a sharded checkpoint folder (`__0_0.distcp`, `.metadata`, `ksuit.th`):
    letters, digits, '_', '.', '-', never '.' or '..' or a temporary name."""
    return (
        isinstance(name, str)
        and _PART_RE.match(name) is not None
        and name not in (".", "..")
        and not name.endswith(TEMP_SUFFIX)
    )


def manifest_filename(group: str, tag: str) -> str:
    """`<group>_cp=<tag>.manifest.json`; never ends in `.th`."""
    return f"{group}_cp={tag}{MANIFEST_SUFFIX}"


def parse_manifest_filename(filename: str) -> tuple[str, str] | None:
    """`(group, tag)` of a manifest file name, or None."""
    match = _MANIFEST_RE.fullmatch(filename)
    if match is None:
        return None
    return match["name"] + match["info"], match["tag"]


TEMP_TOKEN_RE = re.compile(r"^[0-9a-f]{8}$")  # what `ksuit.storage.atomic.new_temp_path` draws
_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<token>[0-9a-f]{8})" + re.escape(TEMP_SUFFIX) + "$")
_JOURNAL_RE = re.compile(r"^" + re.escape(JOURNAL_PREFIX) + r"(?P<seq>[0-9]{1,20})\.json$")
FORMAT_EXTENSIONS = tuple(f".{ext}" for ext in EXTENSIONS.values())
MAX_FILENAME_BYTES = 255


def is_plain_filename(name: object) -> bool:
    """A name that can only mean a file directly inside the folder it is joined to: a str, not
    empty, no '/', '\\' or NUL, not starting with '.' (so never '.' or '..'), at most 255 bytes,
    not ending in the temp suffix."""
    if not isinstance(name, str) or name == "" or name.startswith(".") or name.endswith(TEMP_SUFFIX):
        return False
    if any(c in name for c in ("/", "\\", "\0")):
        return False
    return len(name.encode("utf-8", "surrogateescape")) <= MAX_FILENAME_BYTES


def temp_filename(final_name: str, token: str) -> str:
    """The name a file is written under before it is renamed to `final_name`:
    `.<final name>.<token>.tmp`, token 8 lowercase hex digits (see `TEMP_TOKEN_RE`)."""
    if not isinstance(token, str) or not TEMP_TOKEN_RE.match(token):
        raise ValueError(f"temp token {token!r} must be 8 lowercase hex digits")
    return f".{final_name}.{token}{TEMP_SUFFIX}"


def temp_final_name(filename: str) -> str | None:
    """The final name a temp file of ksuit's grammar stands for, or None when `filename` is not
    `.<final>.<8 hex>.tmp` with `final` a plain file name or a journal name."""
    match = _TEMP_RE.match(filename) if isinstance(filename, str) else None
    if match is None:
        return None
    final = match["final"]
    return final if is_plain_filename(final) or is_journal_filename(final) else None


def is_foreign_filename(filename: object) -> bool:
    """Another framework's checkpoint file that ksuit writes in a set of its own: a plain name
    ending in one of `FOREIGN_EXTENSIONS` (Lightning's `epoch=3-step=40.ckpt`, `last.ckpt`)."""
    return (
        is_plain_filename(filename)
        and isinstance(filename, str)
        and filename.endswith(FOREIGN_EXTENSIONS)
        and len(filename) > max(len(e) for e in FOREIGN_EXTENSIONS)
    )


def is_ksuit_filename(filename: str) -> bool:
    """A final name ksuit writes into a checkpoint folder: a checkpoint file, a manifest, a
    journal, the pins file, a plain name in one of ksuit's formats (`.th`, `.safetensors`), a
    foreign checkpoint file ksuit writes (`.ckpt`) or a folder manifest."""
    if is_journal_filename(filename) or filename == PINS_FILENAME:
        return True
    if not is_plain_filename(filename):
        return False
    return (
        parse_checkpoint_filename(filename) is not None
        or parse_manifest_filename(filename) is not None
        or filename.endswith(FORMAT_EXTENSIONS)
        or is_foreign_filename(filename)
        or filename == FOLDER_MANIFEST
    )


def is_temp_filename(filename: str) -> bool:
    """A temporary file ksuit itself writes (`.<final>.<token>.tmp` for a final name of
    `is_ksuit_filename`): recovery deletes these, and no other dot-file ending in `.tmp`."""
    final = temp_final_name(filename)
    return final is not None and is_ksuit_filename(final)


def journal_filename(sequence: int) -> str:
    return f"{JOURNAL_PREFIX}{sequence:020d}.json"


def journal_sequence(filename: str) -> int | None:
    """The commit sequence in a journal file name, or None when it is not one."""
    match = _JOURNAL_RE.match(filename) if isinstance(filename, str) else None
    return None if match is None else int(match["seq"])


def is_journal_filename(filename: str) -> bool:
    return journal_sequence(filename) is not None
