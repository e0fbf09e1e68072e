"""Faults between ksuit and a real S3 endpoint: a proxy on loopback fails or drops a share of the
requests (or chosen ones), and the store refuses access. Transient faults are retried within the
budget; a save either commits whole or fails cleanly with the previous set intact; permanent
faults fail at once, before anything is written, naming the URL and the cause."""

from __future__ import annotations

import pytest
import torch

from ksuit.readers import scan_sets
from ksuit.storage import (
    PendingFile,
    SetWriter,
    StoreAccessError,
    StoreUnavailableError,
    load_file,
    open_backend,
)
from ksuit.storage.objectstore.retry import RetryPolicy
from tests.s3_server import FaultProxy, Rule, proxied_options

MIB = 1 << 20
QUICK = RetryPolicy(max_seconds=30, max_attempts=30, first_delay=0.005, max_delay=0.05)
ITERATION = {"epoch": 0, "update": 1, "sample": 4}


def files(value: float, big: bool = True) -> list[PendingFile]:
    """A set of two files; the weights take two multipart parts (5 MiB and the rest) when `big`."""
    weights = torch.full(((6 * MIB if big else 1024) // 4,), value)
    return [
        PendingFile(
            "m_cp=latest_model.th", {"state_dict": {"w": weights}}, "torch", "model", "m", "latest", ITERATION
        ),
        PendingFile("m_cp=latest_trainer.th", {"value": value}, "torch", "trainer", "m", "latest", ITERATION),
    ]


def proxied(s3, proxy: FaultProxy, policy: RetryPolicy = QUICK):
    backend = open_backend(f"{s3.url}/run/checkpoints", proxied_options(proxy, ksuit_part_size=5 * MIB))
    backend.store.policy = policy
    return backend


def committed_value(s3) -> float:
    """The value of the committed set, read directly (no proxy), after checking it whole."""
    sets = scan_sets(f"{s3.url}/run", checksum=True)
    assert [s.ok for s in sets] == [True], [s.problems for s in sets]
    trainer = load_file(f"{s3.url}/run/checkpoints/m_cp=latest_trainer.th")["value"]
    weights = load_file(f"{s3.url}/run/checkpoints/m_cp=latest_model.th")["state_dict"]["w"]
    assert bool((weights == trainer).all()), "the set mixes two saves"
    return float(trainer)


def spread(total: float) -> dict[str, float]:
    return dict.fromkeys(("503", "500", "drop", "lost"), total / 4)


@pytest.mark.parametrize(
    ("rates", "attempts"),
    [(spread(0.2), 30), (spread(0.4), 30), (spread(0.6), 4)],
    ids=["20%", "40%", "60%-4-attempts"],
)
def test_saves_through_a_faulty_network_commit_whole_or_fail_cleanly(s3, rates, attempts):
    SetWriter(open_backend(f"{s3.url}/run/checkpoints")).write(files(0.0, big=False), run_id="run")
    with FaultProxy(s3.endpoint.url, rates, seed=attempts + int(sum(rates.values()) * 100)) as proxy:
        policy = RetryPolicy(max_seconds=30, max_attempts=attempts, first_delay=0.005, max_delay=0.05)
        writer = SetWriter(proxied(s3, proxy, policy))
        outcomes = []
        for i in range(1, 5):
            before = committed_value(s3)
            try:
                writer.write(files(float(i)), run_id="run")
                outcomes.append("ok")
                assert committed_value(s3) == float(i)
            except StoreUnavailableError:  # the budget ran out: the previous set stands
                outcomes.append("failed")
                assert committed_value(s3) in (before, float(i))  # a lost answer may have committed it
    share = f"{sum(rates.values()):.0%} of requests"
    print(f"\n[fault proxy, {share}, {attempts} attempts] {proxy.counts}: {outcomes}")
    assert proxy.faults() > 0, proxy.counts
    if attempts > 4:  # a generous budget: every save gets through
        assert outcomes == ["ok"] * 4


def test_answers_lost_at_each_commit_step_are_recognised_on_retry(s3):
    """The request reached the store but its answer did not: the retry finds the write done (the
    completed upload, the record with the same bytes, the head naming this save) and the save
    commits exactly once."""
    with FaultProxy(s3.endpoint.url) as proxy:
        proxy.rules = [
            Rule("POST", "m_cp=latest_model.th", "lost", query="uploadId"),  # complete multipart upload
            Rule("PUT", "/.ksuit/commits/", "lost"),
            Rule("PUT", "/.ksuit/HEAD.json", "lost"),
        ]
        backend = proxied(s3, proxy)
        SetWriter(backend).write(files(1.0), run_id="run")
        SetWriter(backend).write(files(2.0), run_id="run")
        assert [rule.count for rule in proxy.rules] == [0, 0, 0], proxy.log  # every rule fired
    assert committed_value(s3) == 2.0
    head = open_backend(f"{s3.url}/run/checkpoints").read_head(fresh=True).head
    assert len(head.saves()) == 1


def test_a_commit_that_keeps_failing_fails_the_save_and_keeps_the_previous_set(s3):
    SetWriter(open_backend(f"{s3.url}/run/checkpoints")).write(files(1.0, big=False), run_id="run")
    with FaultProxy(s3.endpoint.url) as proxy:
        proxy.rules = [Rule("PUT", "/.ksuit/HEAD.json", "503", count=10**6)]
        backend = proxied(
            s3, proxy, RetryPolicy(max_seconds=1, max_attempts=5, first_delay=0.01, max_delay=0.05)
        )
        with pytest.raises(
            StoreUnavailableError, match=r"put_object s3://.*HEAD\.json failed 5 times"
        ) as info:
            SetWriter(backend).write(files(2.0), run_id="run")
    assert "may or may not name this save" in "".join(getattr(info.value, "__notes__", []))
    assert committed_value(s3) == 1.0
    report = open_backend(f"{s3.url}/run/checkpoints").repair(0)  # nothing is running any more
    assert len(report.removed_temps) == 3  # the two staged files and the commit record
    assert committed_value(s3) == 1.0


def test_access_denied_fails_at_once_before_anything_is_written(s3):
    with FaultProxy(s3.endpoint.url) as proxy:
        proxy.deny_all = True
        with pytest.raises(
            StoreAccessError, match=rf"access to s3://{s3.bucket}/run/checkpoints/.* refused \(403"
        ):
            SetWriter(proxied(s3, proxy)).write(files(1.0), run_id="run")
        assert proxy.counts["requests"] == 1  # no retry
        assert [m for m, _, _ in proxy.log] == ["GET"]  # the head's read: nothing was written
    assert s3.keys() == []


def test_a_missing_bucket_is_named_and_never_created(s3):
    url = "s3://ksuit-no-such-bucket/runs/run/checkpoints"
    with pytest.raises(
        StoreAccessError, match="the bucket 'ksuit-no-such-bucket' .* ksuit never creates buckets"
    ):
        SetWriter(open_backend(url)).write(files(1.0, big=False), run_id="run")
    names = [b["Name"] for b in s3.endpoint.client().list_buckets()["Buckets"]]
    assert "ksuit-no-such-bucket" not in names


def test_missing_credentials_are_named(s3, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    backend = open_backend(f"{s3.url}/runs/run", {"skip_instance_cache": True})  # a new client
    with pytest.raises(
        StoreAccessError, match=f"no credentials to reach {s3.url}/runs/run/.* AWS_ACCESS_KEY_ID"
    ):
        SetWriter(backend.child("checkpoints")).write(files(1.0, big=False), run_id="run")
    assert s3.keys() == []
