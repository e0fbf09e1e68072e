"""Property test: random sequences of saves (resumable or weights only, with and without
`latest`, with a validation loss), named tags, restarts under a new policy (as a new process),
pins and unpins. After every step:

- after a save, disk use is within `max_bytes`; a save that does not fit fails with ENOSPC
  having written and deleted nothing (a new policy takes effect at the next save);
- resume picks the newest resumable save that returned; named tags and pinned sets are there;
- no set that a rule keeps was deleted (unless the budget evicted it), and after a save every
  remaining progress set is kept by a rule or protected;
- every set is complete (sizes; checksums too at the end of each sequence), and no journal or
  temporary file is left.

The rules are checked against a small re-implementation here (the oracle), not the planner.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksuit.layout import is_journal_filename, is_temp_filename
from ksuit.readers import scan_sets, select_resume_set
from ksuit.retention import KeepBest, RetentionPolicy, pin, pinned_tags, unpin
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import autoencoder_config, train_one_step
from tests.retention.helpers import GROUP, Saver, bytes_on_disk

_SIZES: dict[str, int] = {}
_MODEL: list[Autoencoder] = []


def shared_model() -> Autoencoder:
    """One small model with optimizer state for every example (its files are all that matter)."""
    if not _MODEL:
        model = Autoencoder(autoencoder_config()).initialize()
        train_one_step(model)
        _MODEL.append(model)
    return _MODEL[0]


def sizes() -> dict[str, int]:
    """The bytes of a folder after its first save (a progress set and latest) and what each
    further save adds (one progress set), measured once."""
    if not _SIZES:
        root = Path(tempfile.mkdtemp(prefix="ksuit-probe-"))
        try:
            saver = Saver(root, model=shared_model())
            saver.save()
            one = bytes_on_disk(saver.folder)
            saver.save()
            _SIZES.update(one=one, per_set=bytes_on_disk(saver.folder) - one)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return _SIZES


@st.composite
def policies(draw) -> RetentionPolicy:
    budget = draw(st.none() | st.integers(0, 6))
    best = draw(st.none() | st.tuples(st.sampled_from(["min", "max"]), st.integers(1, 2)))
    return RetentionPolicy(
        keep_last=draw(st.none() | st.integers(1, 3)),
        keep_every_updates=draw(st.none() | st.integers(2, 4)),
        keep_best=None if best is None else KeepBest(metric="loss", mode=best[0], n=best[1]),
        max_bytes=None if budget is None else sizes()["one"] + budget * sizes()["per_set"],
    )


saves = st.tuples(st.just("save"), st.booleans(), st.booleans(), st.floats(0.0, 1.0, width=16))
ops = st.one_of(
    saves,
    saves,
    saves,
    st.tuples(st.just("named"), st.sampled_from(["best_model.loss", "last"])),
    st.tuples(st.just("restart"), policies()),
    st.tuples(st.just("pin"), st.integers(0, 10)),
    st.tuples(st.just("unpin"), st.integers(0, 10)),
)


@dataclass
class Model:
    """What the test knows independently of the code under test."""

    policy: RetentionPolicy | None
    newest_resumable: int | None = None  # update of the newest resumable save that returned
    named: set[str] = field(default_factory=set)


def progress(run_dir: Path, sets=None) -> dict[str, tuple[int, float | None]]:
    """{tag: (update, loss)} of the group's committed progress sets."""
    return {
        s.tag: (s.training_iteration.update, (s.manifest.metrics or {}).get("loss"))
        for s in (scan_sets(run_dir) if sets is None else sets)
        if s.group == GROUP and s.tag.startswith("E") and s.manifest is not None
    }


def kept_by_rules(policy: RetentionPolicy, sets: dict[str, tuple[int, float | None]]) -> set[str]:
    """The oracle: which progress sets the rules keep."""
    order = sorted(sets, key=lambda t: sets[t][0])
    kept: set[str] = set()
    if policy.keep_last:
        kept.update(order[-policy.keep_last :])
    if policy.keep_every_updates:
        kept.update(t for t in order if sets[t][0] % policy.keep_every_updates == 0)
    for best in policy.best:
        scored = sorted(
            (t for t in order if sets[t][1] is not None),
            key=lambda t: (sets[t][1] * (1 if best.mode == "min" else -1), -sets[t][0]),
        )
        kept.update(scored[: best.n])
    return kept


def check(saver: Saver, model: Model, before: dict, saved: bool, checksum: bool = False) -> None:
    run_dir, folder, policy = saver.run_dir, saver.folder, model.policy
    names = os.listdir(folder) if folder.is_dir() else []
    assert not [n for n in names if is_temp_filename(n) or is_journal_filename(n)], names
    if not names:
        return
    if saved and policy is not None and policy.max_bytes is not None:
        assert bytes_on_disk(folder) <= policy.max_bytes
    sets = scan_sets(run_dir, checksum=checksum)
    assert all(s.ok for s in sets), [s.problems for s in sets if not s.ok]
    present = {s.tag for s in sets}
    assert model.named <= present
    pins = pinned_tags(run_dir)
    assert pins <= present
    chosen = None
    if model.newest_resumable is not None:
        chosen, _ = select_resume_set(run_dir, GROUP)
        assert chosen.training_iteration.update == model.newest_resumable
    after = progress(run_dir, sets)
    if policy is None or not policy.has_rules:
        if policy is None or policy.max_bytes is None:
            assert set(before) <= set(after), "nothing may be deleted without a rule or budget"
        return
    everything = {**before, **after}
    rules_keep = kept_by_rules(policy, everything)
    if policy.max_bytes is None:
        assert not (set(before) - set(after)) & rules_keep, "a set a rule keeps was deleted"
    if saved:  # after a committed save, what remains is kept by a rule or protected
        protected = set(pins) | ({chosen.tag} if chosen is not None else set())
        assert set(after) <= kept_by_rules(policy, after) | protected | rules_keep


def step(saver: Saver, model: Model, op: tuple) -> None:
    kind = op[0]
    before = progress(saver.run_dir) if saver.folder.is_dir() else {}
    saved = False
    if kind in ("save", "named"):
        entries = sorted(os.listdir(saver.folder)) if saver.folder.is_dir() else []
        try:
            if kind == "save":
                _, resumable, latest, loss = op
                latest = latest and resumable  # a weights-only `latest` would mix iterations in it
                tag = saver.save(latest=latest, resumable=resumable, metrics={"loss": loss})
                if resumable:
                    model.newest_resumable = saver.counter.update
                if latest:
                    model.named.add("latest")
            else:
                tag = saver.save(tag=op[1], resumable=True, latest=False)
                model.named.add(tag)
                model.newest_resumable = saver.counter.update
            saved = tag is not None
        except OSError as e:
            assert (
                e.errno == errno.ENOSPC and model.policy is not None and model.policy.max_bytes is not None
            ), e
            assert sorted(os.listdir(saver.folder)) == entries, "a save that did not fit changed the folder"
            saver.counter.next_update()  # the counter moved; keep updates unique
    elif kind == "restart":
        model.policy = op[1]
        saver.restart(op[1])
    elif before:
        tags = sorted(before)
        pins = pinned_tags(saver.run_dir)
        if kind == "pin":
            pin(saver.run_dir, tags[op[1] % len(tags)])
        elif pins:
            unpin(saver.run_dir, sorted(pins)[op[1] % len(pins)])
    check(saver, model, before, saved)


def scratch() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="ksuit-property-", dir=base))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=policies(), sequence=st.lists(ops, min_size=1, max_size=8))
def test_guarantees_and_budget_hold_after_every_step(first, sequence):
    root = scratch()
    try:
        saver = Saver(root, train=False, model=shared_model())
        saver.save()  # the budget estimates a save from the files' sizes the last time
        saver.restart(first)
        model = Model(first, newest_resumable=saver.counter.update, named={"latest"})
        for op in sequence:
            step(saver, model, op)
        check(saver, model, progress(saver.run_dir) if saver.folder.is_dir() else {}, False, checksum=True)
        saver.writer.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    "policy", [RetentionPolicy(keep_last=1), RetentionPolicy(keep_every_updates=2, max_bytes=10**9)]
)
def test_the_oracle_agrees_on_a_plain_run(policy):
    """The oracle itself: a run without pins or restarts keeps what the rules say."""
    root = scratch()
    try:
        saver = Saver(root, policy, train=False)
        for _ in range(5):
            saver.save(latest=False)
        assert set(progress(saver.run_dir)) == kept_by_rules(policy, progress(saver.run_dir)) | {
            select_resume_set(saver.run_dir, GROUP)[0].tag
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
