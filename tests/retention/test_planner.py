"""The rules and the pure planner, on hand-made facts: which sets each rule keeps, that
guarantees always win, and how the budget evicts."""

from __future__ import annotations

import pytest

from ksuit.retention import FolderFacts, KeepBest, RetentionPolicy, SetFacts, plan
from ksuit.retention.estimate import kept_at_most
from ksuit.utils.training import TrainingIteration

NOW = 10**18
UPE = 10  # updates per epoch in these facts


def progress(update: int, group: str = "m", size: int = 100, guarantee: str | None = None, **metrics):
    it = TrainingIteration(epoch=update // UPE, update=update, sample=update * 4)
    tag = str(it)
    manifest = f"{group}_cp={tag}.manifest.json"
    names = (f"{group}_cp={tag}_model.th", manifest)
    return SetFacts(manifest, group, tag, it, names, metrics, NOW - (1000 - update) * 10**9, guarantee)


def folder(
    *sets: SetFacts, size: int = 100, free: int | None = None, shared: dict | None = None
) -> FolderFacts:
    files = {}
    for s in sets:
        for name in s.names:
            files[name] = ((shared or {}).get(name, name), size)
    return FolderFacts("/run/checkpoints", tuple(sets), files, free)


def kept(p) -> list[str]:
    return [d.set.tag for d in p.decisions if not d.delete]


def deleted(p) -> list[str]:
    return [s.tag for s in p.deletions]


def test_keep_last_keeps_the_newest_n_of_each_group():
    sets = [progress(u) for u in (10, 20, 30, 40)] + [progress(u, group="ema") for u in (10, 20)]
    p = plan(folder(*sets), RetentionPolicy(keep_last=2), NOW)
    assert deleted(p) == ["E1_U10_S40", "E2_U20_S80"]
    assert {d.set.label() for d in p.decisions if not d.delete} == {
        "m@E3_U30_S120",
        "m@E4_U40_S160",
        "ema@E1_U10_S40",
        "ema@E2_U20_S80",
    }
    assert all(d.reasons == ("no rule keeps it",) for d in p.decisions if d.delete)


def test_milestones_keep_the_first_set_at_each_multiple():
    # two sets in epoch 2 (U20 at its start, U25 inside): the first is the milestone
    sets = [progress(u) for u in (10, 20, 25, 30, 40)]
    p = plan(folder(*sets), RetentionPolicy(keep_every_epochs=2), NOW)
    assert kept(p) == ["E2_U20_S80", "E4_U40_S160"]
    reasons = {d.set.tag: d.reasons for d in p.decisions}
    assert reasons["E4_U40_S160"] == ("keep_every_epochs 2 (epoch 4)",)
    p = plan(folder(*sets), RetentionPolicy(keep_every_updates=25), NOW)
    assert kept(p) == ["E2_U25_S100"]
    p = plan(folder(*sets), RetentionPolicy(keep_every_samples=120), NOW)
    assert kept(p) == ["E3_U30_S120"]


def test_keep_best_reads_recorded_metrics_min_and_max():
    sets = [
        progress(10, loss=0.5),
        progress(20, loss=0.2),
        progress(30, loss=0.3),
        progress(40),
        progress(50, loss=0.2),
    ]
    p = plan(folder(*sets), RetentionPolicy(keep_best=KeepBest(metric="loss", mode="min", n=2)), NOW)
    assert kept(p) == ["E2_U20_S80", "E5_U50_S200"]  # a tie: both 0.2
    p = plan(folder(*sets), RetentionPolicy(keep_best=[KeepBest(metric="loss", mode="max", n=1)]), NOW)
    assert kept(p) == ["E1_U10_S40"]
    assert "keep_best loss:max:1 (loss 0.5, #1)" in p.decisions[0].reasons


def test_keep_within_hours_uses_the_save_time():
    sets = [progress(u) for u in (10, 20, 30)]  # saved 990 s, 980 s, 970 s ago
    p = plan(folder(*sets), RetentionPolicy(keep_within_hours=975 / 3600), NOW)
    assert kept(p) == ["E3_U30_S120"]


def test_a_set_survives_when_any_rule_keeps_it_with_every_reason():
    sets = [progress(u) for u in (10, 20, 30, 40)]
    p = plan(folder(*sets), RetentionPolicy(keep_last=1, keep_every_epochs=2), NOW)
    assert kept(p) == ["E2_U20_S80", "E4_U40_S160"]
    assert p.decisions[3].reasons == ("keep_last 1", "keep_every_epochs 2 (epoch 4)")


def test_guarantees_beat_every_rule_and_count_for_keep_last():
    sets = [
        progress(10, guarantee="pinned"),
        progress(20),
        progress(30),
        progress(40, guarantee="resume picks it"),
    ]
    p = plan(folder(*sets), RetentionPolicy(keep_last=2), NOW)
    # the newest two are U30 and U40 (U40 protected anyway); U10 is pinned
    assert kept(p) == ["E1_U10_S40", "E3_U30_S120", "E4_U40_S160"]
    assert p.decisions[0].reasons == ("pinned",)


def test_named_tags_and_uncommitted_sets_are_never_candidates():
    named = SetFacts("m_cp=latest.manifest.json", "m", "latest", None, ("x",), guarantee="'latest'")
    orphan = SetFacts(
        "m_cp=E9_U90_S360.manifest.json",
        "m",
        "E9_U90_S360",
        None,
        ("y",),
        committed=False,
        guarantee="not committed",
    )
    p = plan(folder(named, orphan, progress(10)), RetentionPolicy(keep_last=1), NOW)
    assert deleted(p) == []


def test_no_rule_keeps_everything_the_budget_evicts_oldest_first():
    sets = [progress(u) for u in (10, 20, 30, 40)]  # 200 bytes each (file + manifest)
    p = plan(folder(*sets), RetentionPolicy(), NOW)
    assert deleted(p) == []
    p = plan(folder(*sets), RetentionPolicy(max_bytes=500), NOW)
    assert deleted(p) == ["E1_U10_S40", "E2_U20_S80"] and p.bytes_after == 400
    assert "evicted for the budget (max_bytes 500 B), oldest first" in p.decisions[0].reasons
    # with the next save's 150 bytes counted, one more goes
    p = plan(folder(*sets), RetentionPolicy(max_bytes=500), NOW, incoming=150)
    assert deleted(p) == ["E1_U10_S40", "E2_U20_S80", "E3_U30_S120"]


def test_the_budget_evicts_expired_sets_first_and_never_a_protected_one():
    sets = [progress(10, guarantee="pinned"), progress(20), progress(30), progress(40)]
    policy = RetentionPolicy(keep_every_epochs=2, max_bytes=500)
    # before a save (rules deferred): U30 expired by the rules goes before U20 that a rule keeps
    p = plan(folder(*sets), policy, NOW, incoming=100, defer_rules=True)
    assert deleted(p) == ["E2_U20_S80", "E3_U30_S120"]
    reasons = {d.set.tag: d.reasons[0] for d in p.decisions}
    assert reasons["E3_U30_S120"].startswith("evicted") and reasons["E1_U10_S40"] == "pinned"
    p = plan(folder(*sets), RetentionPolicy(keep_every_epochs=2, max_bytes=600), NOW, defer_rules=True)
    assert deleted(p) == ["E3_U30_S120"]


def test_deferred_rules_delete_nothing_without_budget_pressure():
    sets = [progress(u) for u in (10, 20, 30)]
    p = plan(folder(*sets), RetentionPolicy(keep_last=1), NOW, defer_rules=True)
    assert deleted(p) == []
    assert p.decisions[0].reasons == ("no rule keeps it; deleted once the new set is committed",)


def test_a_budget_that_cannot_be_met_names_the_need_the_budget_and_what_is_protected():
    sets = [progress(10, guarantee="pinned (`ksuit unpin` releases it)"), progress(20)]
    p = plan(folder(*sets), RetentionPolicy(max_bytes=300), NOW, incoming=250)
    assert p.shortfall is not None
    assert "needs about 250 bytes" in p.shortfall and "max_bytes 300 B" in p.shortfall
    assert "m@E1_U10_S40 (200 B: pinned" in p.shortfall


def test_min_free_bytes_counts_what_deletions_free():
    sets = [progress(u) for u in (10, 20, 30)]
    p = plan(folder(*sets, free=100), RetentionPolicy(min_free_bytes=250), NOW, incoming=50)
    assert deleted(p) == ["E1_U10_S40"]  # 100 + 200 freed - 50 = 250
    p = plan(folder(*sets, free=100), RetentionPolicy(min_free_bytes=251), NOW, incoming=50)
    assert deleted(p) == ["E1_U10_S40", "E2_U20_S80"]


def test_hard_links_count_once_and_free_nothing_while_another_name_holds_them():
    a, b = progress(10), progress(20)
    shared = {a.names[0]: "inode-1", "m_cp=latest_model.th": "inode-1"}
    latest = SetFacts(
        "m_cp=latest.manifest.json", "m", "latest", None, ("m_cp=latest_model.th",), guarantee="'latest'"
    )
    f = folder(a, b, latest, shared=shared)
    assert f.usage() == 400  # 5 names, one pair of them links of one file
    p = plan(f, RetentionPolicy(max_bytes=250), NOW)
    # deleting U10 frees only its manifest (its weights live on as latest's): U20 goes too
    assert deleted(p) == ["E1_U10_S40", "E2_U20_S80"] and p.bytes_after == 100


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (RetentionPolicy(keep_last=2), 3),
        (RetentionPolicy(keep_last=2, keep_every_epochs=10), 12),  # E10..E90, E98, E99 and the new one
        (RetentionPolicy(keep_every_epochs=50), 2),
        (RetentionPolicy(keep_within_hours=1.0), 100),
        (RetentionPolicy(max_bytes="1GiB"), 100),
    ],
)
def test_the_most_sets_a_run_holds_under_a_policy(policy, expected):
    saves = [(e, e * 10, e * 40) for e in range(1, 101)]  # one save per epoch for 100 epochs
    assert kept_at_most(policy, saves) == expected


def test_policy_values_are_checked_and_sizes_accept_units():
    assert RetentionPolicy(max_bytes="20GiB").max_bytes == 20 << 30
    assert RetentionPolicy(min_free_bytes="500MB").min_free_bytes == 500 * 10**6
    for bad in (
        {"keep_last": 0},
        {"keep_last": True},
        {"max_bytes": "lots"},
        {"keep_best": {"metric": "x", "mode": "avg"}},
        {"keep_everything": True},
    ):
        with pytest.raises(ValueError):
            RetentionPolicy.model_validate(bad)
    assert RetentionPolicy(keep_last=2, max_bytes=1024).describe() == "keep_last 2, max_bytes 1.0 KiB"
