"""What one save writes: the save options as one value (`SaveSpec`) and the tags they expand to
(`SaveSpec.plan`), a pure function tested on its own."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ksuit.layout import LAST, LATEST


@dataclass(frozen=True)
class TagPlan:
    """The files of one tag: weights and/or optimizer states of the selected leaves, and the
    trainer file when the save has a trainer."""

    tag: str
    weights: bool
    optim: bool
    trainer: bool


@dataclass(frozen=True)
class SaveSpec:
    """The options of `CheckpointWriter.save` (the seed's names) as one value, passed as it is
    by the trainer and the checkpoint callbacks."""

    save_weights: bool = True
    save_optim: bool = True
    save_latest_weights: bool = False
    save_latest_optim: bool = False
    model_names_to_save: tuple[str, ...] | None = None
    save_frozen_weights: bool = True
    save_last: bool = False
    """Also write `last` in the same save (everything the spec writes under any tag): at the
    end of training, so `last` shares the bytes of the other tags' identical files."""

    def __post_init__(self) -> None:
        names = self.model_names_to_save
        if names is not None:
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise TypeError(f"model_names_to_save must be a list of str, got {names!r}")
            object.__setattr__(self, "model_names_to_save", tuple(names))

    @property
    def writes_latest(self) -> bool:
        return self.save_latest_weights or self.save_latest_optim

    @property
    def resumable(self) -> bool:
        """Whether its sets carry optimizer state, the part only a resume needs."""
        return self.save_optim or self.save_latest_optim

    @property
    def writes_progress(self) -> bool:
        """Whether a save writes files under its own (progress) tag, not only `latest`."""
        return self.save_weights or self.save_optim

    def latest_only(self) -> SaveSpec:
        """The files `latest` gets, saved under `latest` alone."""
        return replace(
            self,
            save_weights=self.save_latest_weights,
            save_optim=self.save_latest_optim,
            save_latest_weights=False,
            save_latest_optim=False,
        )

    def merged(self) -> SaveSpec:
        """Every kind of file the spec writes under any tag, under one tag (e.g. `last`)."""
        return replace(
            self,
            save_weights=self.save_weights or self.save_latest_weights,
            save_optim=self.save_optim or self.save_latest_optim,
            save_latest_weights=False,
            save_latest_optim=False,
            save_last=False,
        )

    def plan(self, checkpoint_tag: str, with_trainer: bool) -> list[TagPlan]:
        """The tags a save under `checkpoint_tag` writes: the tag itself for `save_weights` /
        `save_optim`, plus `latest` for `save_latest_*` (one plan when the tag is `latest`), plus
        `last` with `save_last`. A trainer file goes with the tag asked for, and with `latest`
        and `last` when they get any file."""
        plans = [TagPlan(checkpoint_tag, self.save_weights, self.save_optim, with_trainer)]
        if self.writes_latest:
            if checkpoint_tag == LATEST:
                plans = [
                    TagPlan(
                        LATEST,
                        self.save_weights or self.save_latest_weights,
                        self.save_optim or self.save_latest_optim,
                        with_trainer,
                    )
                ]
            else:
                plans.append(TagPlan(LATEST, self.save_latest_weights, self.save_latest_optim, with_trainer))
        if self.save_last and checkpoint_tag != LAST:
            merged = self.merged()
            plans.append(TagPlan(LAST, merged.save_weights, merged.save_optim, with_trainer))
        return plans

    def trainer_tags(self, checkpoint_tag: str) -> list[str]:
        """The tags whose sets get a trainer file (so a resume may start there)."""
        return [p.tag for p in self.plan(checkpoint_tag, with_trainer=True) if p.trainer]
