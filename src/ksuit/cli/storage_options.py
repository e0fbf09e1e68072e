"""`--storage-option KEY=VALUE`: options for the file system of every URL a command opens
(s3fs: `endpoint_url`, `key`, `secret`, `profile`, `client_kwargs.region_name`, ...; ksuit's own
`ksuit_part_size`, `ksuit_retry_seconds`, ... see `ksuit.storage.objectstore`).

It is an option of `ksuit` itself, handled here for every command: `ksuit --storage-option
endpoint_url=http://... ls s3://bucket/runs/x`; `main()` also accepts it after the command's
name (`ksuit ls s3://... --storage-option ...`). A value is JSON when it parses as JSON
(`true`, `3`, `{"a": 1}`), else a string; a dotted key sets a nested option.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from ksuit.storage import set_storage_options

OPTION = "--storage-option"
HELP = (
    "KEY=VALUE for the file system of URL locations (s3fs: endpoint_url, key, secret, profile, "
    "client_kwargs.region_name, ...); repeat it for several. Credentials also come from AWS_* "
    "variables and ~/.aws."
)
_SECRET_WORDS = ("secret", "key", "token", "password", "credential")
_given: list[str] = []


def parse_storage_options(values: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise typer.BadParameter(
                f"{item!r} is not KEY=VALUE (e.g. endpoint_url=http://localhost:9000)", param_hint=OPTION
            )
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        target = options
        for part in parts[:-1]:
            nested = target.setdefault(part, {})
            if not isinstance(nested, dict):
                raise typer.BadParameter(f"{key!r} sets a value inside {part!r}, which is not a mapping")
            target = nested
        target[parts[-1]] = value
    return options


def apply_storage_options(values: list[str] | None) -> None:
    """Registers the options for every URL this command opens."""
    values = list(values or [])
    set_storage_options("", parse_storage_options(values) if values else None)
    _given[:] = values


def storage_option_args() -> list[str]:
    """The `--storage-option` arguments of this command without credentials (for the resume
    command a run prints)."""
    args: list[str] = []
    for item in _given:
        key = item.partition("=")[0].lower()
        if not any(word in key for word in _SECRET_WORDS):
            args += [OPTION, item]
    return args


def hoist_storage_options(argv: list[str]) -> list[str]:
    """`argv` with every `--storage-option X` (or `--storage-option=X`) moved before the command."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == OPTION and i + 1 < len(argv):
            front += [arg, argv[i + 1]]
            i += 2
            continue
        if arg.startswith(OPTION + "="):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest
