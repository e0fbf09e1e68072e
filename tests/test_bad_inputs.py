"""A table of bad inputs to every public entry point and the error each gets.

Each row: the call, the exception type, and patterns its message must contain (the problem and,
where the fix is not obvious from it, the fix). Every call happens on a run that already holds
a checkpoint; afterwards the whole output tree must be byte-for-byte unchanged: nothing was
written, nothing removed.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from ksuit.providers import PathProvider
from ksuit.readers import load_model, select_resume_set
from ksuit.storage import CorruptCheckpointError, load_file
from ksuit.utils.training import TrainingIteration
from ksuit.writers.checkpoint_writer import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder, AutoencoderConfig, EncoderConfig
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step

OK_SD = {"w": torch.zeros(2)}


def tree(root: Path) -> dict[str, tuple]:
    """Every path below root with its size and mtime (folders too)."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            result[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns, st.st_mode)
    return result


@pytest.fixture
def ctx(tmp_path, path_provider, update_counter):
    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    update_counter.next_update()
    writer = CheckpointWriter(path_provider, update_counter)
    writer.save(
        model,
        "E0_U1_S0",
        trainer=FakeTrainer(update_counter),
        save_latest_weights=True,
        save_latest_optim=True,
    )
    folder = path_provider.checkpoint_path
    # hand-made files for the loading rows (written before the snapshot)
    base = {"state_dict": model.encoder.state_dict(), "model_config": model.encoder.model_config.model_dump()}
    torch.save({**base, "config_kind": "gone_package.configs.EncoderConfig"}, tmp_path / "gone_module.th")
    torch.save(
        {**base, "config_kind": "ksuit.zoo.autoencoder.RenamedEncoderConfig"}, tmp_path / "gone_class.th"
    )
    torch.save({**base, "config_kind": "torch.nn.Linear"}, tmp_path / "not_a_config.th")
    torch.save({"state_dict": OK_SD}, tmp_path / "no_config.th")
    good = (folder / "autoencoder.encoder_cp=E0_U1_S0_model.th").read_bytes()
    (tmp_path / "truncated.th").write_bytes(good[: len(good) // 2])
    (tmp_path / "random.th").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "empty_run").mkdir()
    locked = tmp_path / "locked_run"
    (locked / "checkpoints").mkdir(parents=True)
    locked.chmod(0)
    return SimpleNamespace(
        tmp=tmp_path,
        model=model,
        writer=writer,
        trainer=FakeTrainer(update_counter),
        provider=path_provider,
        counter=update_counter,
        run_dir=path_provider.run_output_path,
        folder=folder,
    )


@contextlib.contextmanager
def unprivileged():
    """Drops root to 'nobody' for the call (root reads every folder whatever its mode)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


class NotPlain:
    pass


class NoStateDict:
    pass


class BadTrainer:
    def state_dict(self):
        return {"callback": NotPlain()}


def ddp_wrapped(c):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{c.tmp.parent / 'ddp_store'}", rank=0, world_size=1)
    try:
        c.writer.save(DistributedDataParallel(c.model), "E0_U2_S0")
    finally:
        dist.destroy_process_group()
        (c.tmp.parent / "ddp_store").unlink(missing_ok=True)


def save_cp(c, name="x_cp=latest_model.th", sd=None, tag="latest", **kw):
    c.writer.save_model_checkpoint(name, OK_SD if sd is None else sd, tag, **kw)


def locked_resume(c):
    with unprivileged():
        select_resume_set(c.tmp / "locked_run", "autoencoder")


CASES = [
    # --- CheckpointWriter.save_model_checkpoint: state_dict, config, extras
    (
        "state_dict is a list",
        lambda c: save_cp(c, sd=[torch.zeros(1)]),
        TypeError,
        ["state_dict must be a dict", "got list", r"model\.state_dict\(\)"],
    ),
    (
        "state_dict is a module",
        lambda c: save_cp(c, sd=c.model),
        TypeError,
        ["must be a dict", "Autoencoder"],
    ),
    (
        "state_dict holds an object",
        lambda c: save_cp(c, sd={"w": NotPlain()}),
        TypeError,
        ["state_dict\\['w'\\]", "NotPlain", "weights_only=True", "Convert it"],
    ),
    (
        "state_dict has an int key",
        lambda c: save_cp(c, sd={1: torch.zeros(1)}),
        TypeError,
        ["key 1", "must be str"],
    ),
    (
        "model_config is a dict",
        lambda c: save_cp(c, model_config={"kind": "a.B", "name": "x"}),
        TypeError,
        ["model_config must be a ModelBaseConfig instance", "got dict"],
    ),
    (
        "extra key reserved",
        lambda c: save_cp(c, run_id="other"),
        ValueError,
        ["reserved", "run_id", "fills them in itself"],
    ),
    ("extra value not plain", lambda c: save_cp(c, note=NotPlain()), TypeError, ["extra", "NotPlain"]),
    # --- output_name escaping the folder or clashing with ksuit's own files
    (
        "output_name ../escape",
        lambda c: save_cp(c, name="../escape.th"),
        ValueError,
        ["output_name '../escape.th'", "path separators"],
    ),
    (
        "output_name absolute",
        lambda c: save_cp(c, name=str(c.tmp / "abs.th")),
        ValueError,
        ["output_name", "'/'", "plain name"],
    ),
    ("output_name in a subfolder", lambda c: save_cp(c, name="sub/x.th"), ValueError, ["'/'", "plain name"]),
    ("output_name backslash", lambda c: save_cp(c, name="sub\\x.th"), ValueError, ["'\\\\\\\\'"]),
    ("output_name '..'", lambda c: save_cp(c, name=".."), ValueError, ["'..'"]),
    ("output_name empty", lambda c: save_cp(c, name=""), ValueError, ["output_name must not be empty"]),
    ("output_name NUL", lambda c: save_cp(c, name="x\0.th"), ValueError, ["'\\\\x00'"]),
    ("output_name temp-like", lambda c: save_cp(c, name=".x.th.abcd.tmp"), ValueError, ["starts with '.'"]),
    (
        "output_name manifest-like",
        lambda c: save_cp(c, name="x_cp=a.manifest.json"),
        ValueError,
        ["reserved for ksuit's own files"],
    ),
    (
        "output_name not a str",
        lambda c: save_cp(c, name=Path("x.th")),
        TypeError,
        ["output_name must be a str"],
    ),
    # --- tags
    ("tag empty", lambda c: save_cp(c, tag=""), ValueError, ["checkpoint tag must not be empty"]),
    (
        "tag with '/'",
        lambda c: c.writer.save(c.model, "E1/U2"),
        ValueError,
        ["checkpoint tag 'E1/U2'", "'/'"],
    ),
    ("tag '..'", lambda c: c.writer.save(c.model, ".."), ValueError, ["checkpoint tag '..'", "plain name"]),
    ("tag with NUL", lambda c: c.writer.save(c.model, "a\0b"), ValueError, ["checkpoint tag", "x00"]),
    (
        "tag not a str",
        lambda c: c.writer.save(c.model, 5),
        TypeError,
        ["checkpoint tag must be a str", "int"],
    ),
    ("tag manifest suffix", lambda c: save_cp(c, tag="x.manifest.json"), ValueError, ["reserved suffix"]),
    # --- CheckpointWriter.save: models, submodels, trainer
    ("DDP-wrapped model", ddp_wrapped, TypeError, ["DistributedDataParallel", r"ddp_model\.module"]),
    (
        "plain nn.Module",
        lambda c: c.writer.save(torch.nn.Linear(2, 2), "latest"),
        TypeError,
        ["ksuit ModelBase", "Linear"],
    ),
    (
        "unknown submodel name",
        lambda c: c.writer.save(c.model, "latest", model_names_to_save=["enc"]),
        ValueError,
        [
            "unknown submodel 'enc'",
            "known: autoencoder, autoencoder.decoder, autoencoder.encoder, decoder, encoder",
        ],
    ),
    (
        "model_names_to_save a str",
        lambda c: c.writer.save(c.model, "latest", model_names_to_save="encoder"),
        TypeError,
        ["must be a list of str"],
    ),
    (
        "trainer without state_dict",
        lambda c: c.writer.save(c.model, "latest", trainer=NoStateDict()),
        TypeError,
        ["state_dict\\(\\) method", "NoStateDict"],
    ),
    (
        "trainer state not plain",
        lambda c: c.writer.save(c.model, "latest", trainer=BadTrainer()),
        TypeError,
        [r"trainer\.state_dict\(\)\['callback'\]", "NotPlain"],
    ),
    # --- constructors and names
    (
        "writer format unknown",
        lambda c: CheckpointWriter(c.provider, c.counter, format="pickle"),
        ValueError,
        ["unknown checkpoint format 'pickle'", "known: torch, safetensors"],
    ),
    (
        "writer path_provider a str",
        lambda c: CheckpointWriter(str(c.tmp), c.counter),
        TypeError,
        ["ksuit.providers.PathProvider", "got str"],
    ),
    (
        "writer max_pending 0",
        lambda c: CheckpointWriter(c.provider, c.counter, max_pending=0),
        ValueError,
        ["max_pending must be an int >= 1"],
    ),
    ("run_id with '/'", lambda c: PathProvider(c.tmp, "a/b"), ValueError, ["run_id 'a/b'", "'/'"]),
    ("run_id '..'", lambda c: PathProvider(c.tmp, ".."), ValueError, ["run_id '..'"]),
    (
        "model name with '_cp='",
        lambda c: AutoencoderConfig(name="ae_cp=1"),
        ValidationError,
        ["'_cp='", "separates name and tag"],
    ),
    ("model name empty", lambda c: EncoderConfig(name=""), ValidationError, ["must not be empty"]),
    ("model name with NUL", lambda c: EncoderConfig(name="enc\0"), ValidationError, ["x00"]),
    # --- resume: missing/unreadable run folders, unknown groups and tags
    (
        "resume: missing run folder",
        lambda c: select_resume_set(c.tmp / "nope", "autoencoder"),
        FileNotFoundError,
        ["run folder .*nope does not exist", "<output_root>/<run_id>"],
    ),
    (
        "resume: run folder is a file",
        lambda c: select_resume_set(c.tmp / "a_file", "autoencoder"),
        NotADirectoryError,
        ["a_file is a file", "pass the run folder"],
    ),
    (
        "resume: no checkpoints folder",
        lambda c: select_resume_set(c.tmp / "empty_run", "autoencoder"),
        FileNotFoundError,
        ["has no checkpoints folder", "is it a ksuit run folder"],
    ),
    (
        "resume: unreadable run folder",
        locked_resume,
        PermissionError,
        ["cannot read the run folder .*locked_run", "permission denied", "fix its permissions"],
    ),
    (
        "resume: run_dir not a path",
        lambda c: select_resume_set(None, "autoencoder"),
        TypeError,
        ["run_dir must be a path"],
    ),
    (
        "resume: unknown group",
        lambda c: select_resume_set(c.run_dir, "auto"),
        FileNotFoundError,
        ["no checkpoints of 'auto'", "found: autoencoder"],
    ),
    (
        "resume: unknown tag",
        lambda c: select_resume_set(c.run_dir, "autoencoder", tag="E9_U9_S9"),
        FileNotFoundError,
        ["no checkpoint set of 'autoencoder' matches E9_U9_S9"],
    ),
    (
        "resume: unknown iteration",
        lambda c: select_resume_set(c.run_dir, "autoencoder", TrainingIteration(epoch=7)),
        FileNotFoundError,
        ["matches E7"],
    ),
    # --- loading a model
    (
        "load_model: config module gone",
        lambda c: load_model(c.tmp / "gone_module.th"),
        ImportError,
        [
            "cannot rebuild the model of .*gone_module.th",
            "gone_package.configs.EncoderConfig",
            "install the package that defines it or fix the path",
        ],
    ),
    (
        "load_model: config class renamed",
        lambda c: load_model(c.tmp / "gone_class.th"),
        ImportError,
        ["gone_class.th", "has no 'RenamedEncoderConfig'", "renamed or moved"],
    ),
    (
        "load_model: config_kind not a config",
        lambda c: load_model(c.tmp / "not_a_config.th"),
        TypeError,
        ["not_a_config.th", "torch.nn.Linear", "not a ModelBaseConfig subclass"],
    ),
    (
        "load_model: no config in file",
        lambda c: load_model(c.tmp / "no_config.th"),
        ValueError,
        ["no_config.th carries no model_config", "load payload\\['state_dict'\\]"],
    ),
    (
        "load_model: optimizer file",
        lambda c: load_model(c.folder / "autoencoder.encoder_cp=latest_optim.th"),
        ValueError,
        ["not a ksuit weights file", r"pass a \*_model.th file"],
    ),
    (
        "load_model: missing file",
        lambda c: load_model(c.folder / "nope_cp=latest_model.th"),
        FileNotFoundError,
        ["nope_cp=latest_model.th does not exist"],
    ),
    (
        "load_file: truncated file",
        lambda c: load_file(c.tmp / "truncated.th"),
        CorruptCheckpointError,
        ["truncated.th", "truncated or corrupt", "ksuit verify"],
    ),
    (
        "load_file: random bytes",
        lambda c: load_file(c.tmp / "random.th"),
        CorruptCheckpointError,
        ["random.th", "not a checkpoint", "written by ksuit or torch.save"],
    ),
]


@pytest.mark.parametrize(("call", "exc", "patterns"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_is_rejected_before_anything_is_written(ctx, call, exc, patterns):
    before = tree(ctx.tmp)
    with pytest.raises(exc) as info:
        call(ctx)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    assert "\n" not in message.strip() or exc is ValidationError, f"not a one-line message: {message!r}"
    assert tree(ctx.tmp) == before, "the bad call changed files on disk"
