"""Hugging Face `Trainer` checkpoints that say when they are complete: `KsuitCallback` and
`last_complete_checkpoint`.

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[KsuitCallback()])
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))

The Trainer writes `checkpoint-<step>/` file by file and fsyncs nothing, and
`transformers.trainer_utils.get_last_checkpoint` (what `resume_from_checkpoint=True` uses) picks
the highest-numbered folder even when a crash cut its save short, so the resume fails or loads
a torn file. After each checkpoint the Trainer writes, `KsuitCallback` makes its files durable
and writes a folder manifest (`ksuit.manifest.json`: every file with size and xxh3-64
checksum), atomically and last: the mark that the checkpoint is complete
(`ksuit.storage.folder_manifest`). `last_complete_checkpoint` returns the newest folder whose
manifest verifies, skipping (and logging) the others; `ksuit verify OUTPUT_DIR` and
`ksuit ls OUTPUT_DIR` report every checkpoint folder.

Add the callback last (after callbacks that write into the checkpoint folder in `on_save`): a
file written after the manifest makes the folder incomplete. Hyperparameter searches, which
save under `output_dir/run-<trial>`, are not covered.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ksuit.integrations._extras import require

require("transformers", "transformers", "ksuit.integrations.transformers")

from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

from ksuit.storage import Backend, Location, open_backend  # noqa: E402
from ksuit.storage.folder_manifest import folder_problems, write_folder_manifest  # noqa: E402

logger = logging.getLogger(__name__)

CHECKPOINT_FOLDER = re.compile(rf"^{re.escape(PREFIX_CHECKPOINT_DIR)}-([0-9]+)$")
WRITTEN_BY = "ksuit.integrations.transformers.KsuitCallback"


class KsuitCallback(TrainerCallback):
    """Marks every checkpoint the Trainer saves complete with a ksuit folder manifest."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not args.should_save:  # the processes that write checkpoints mark them
            return
        folder = open_backend(args.output_dir).child(f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if folder.exists_as() != "folder":
            logger.warning(
                "%s does not exist after the Trainer saved a checkpoint (a hyperparameter search run?); "
                "it is not marked complete",
                folder.location,
            )
            return
        manifest = write_folder_manifest(folder, {"update": int(state.global_step)}, WRITTEN_BY)
        logger.info("marked %s complete (%d files)", folder.location, len(manifest.files))


def checkpoint_folders(output_dir: Location | Backend) -> list[tuple[int, str]]:
    """`(step, folder name)` of the Trainer's checkpoint folders in `output_dir`, newest first."""
    backend = open_backend(output_dir)
    if backend.exists_as() != "folder":
        return []
    found = [(int(m[1]), name) for name in backend.folders() if (m := CHECKPOINT_FOLDER.match(name))]
    return sorted(found, reverse=True)


def last_complete_checkpoint(output_dir: Location | Backend, checksum: bool = True) -> str | None:
    """The newest `checkpoint-<step>` folder of `output_dir` whose ksuit manifest verifies (its
    path, for `trainer.train(resume_from_checkpoint=...)`), or None when there is none.

    Folders without a manifest or with a file that does not match it are skipped and logged.
    `checksum=False` compares sizes only instead of reading every file.
    """
    backend = open_backend(output_dir)
    for _, name in checkpoint_folders(backend):
        problems = folder_problems(backend.child(name), checksum=checksum)
        if not problems:
            return str(backend.file_ref(name))
        described = "; ".join(f"{file}: {problem}" for file, problem in list(problems.items())[:3])
        logger.warning("skipping incomplete checkpoint %s (%s)", backend.file_location(name), described)
    return None


__all__ = ["KsuitCallback", "checkpoint_folders", "last_complete_checkpoint"]
