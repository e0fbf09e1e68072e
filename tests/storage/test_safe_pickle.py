"""The restricted pickle scanner: refuses what a policy does not allow and what is too big to
walk, without running anything; `restricted_loads` reads what it allows."""

from __future__ import annotations

import dataclasses
import datetime
import pickle

import pytest

from ksuit.storage import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.safe_pickle import GlobalRule, PicklePolicy, is_int, restricted_loads, scan_pickle
from tests import hostile as h

PLAIN = PicklePolicy(globals={})
TIMEDELTA = PicklePolicy(
    globals={
        "datetime.timedelta": GlobalRule(
            call=True,
            leaf=True,
            check_args=lambda a: None if all(is_int(x) for x in a) else "non-int arguments",
        )
    }
)


@pytest.mark.parametrize("protocol", range(6))
def test_plain_values_of_every_protocol_load(protocol):
    """Protocols 3+ have opcodes for bytes and 4+ for sets (older ones call globals for them)."""
    value = {"a": [1, 2.5, "x", (1, (2,)), None, True, 10**40], "b": {"c": -3}}
    if protocol >= 3:
        value["bytes"] = b"y"
    if protocol >= 4:
        value["sets"] = [{1, 2}, frozenset({3})]
    assert restricted_loads(pickle.dumps(value, protocol=protocol), PLAIN, "test") == value


def test_an_allowlisted_call_loads_and_its_arguments_are_checked():
    data = pickle.dumps([datetime.timedelta(days=2, seconds=5)], protocol=2)
    assert restricted_loads(data, TIMEDELTA, "td") == [datetime.timedelta(days=2, seconds=5)]
    with pytest.raises(UnsafeCheckpointError, match="refusing to load td: it refers to datetime.timedelta"):
        scan_pickle(data, PLAIN, "td")
    bad = h.pickle_of(h.glob("datetime", "timedelta") + h.uni("x") + h.TUPLE1 + h.REDUCE)
    with pytest.raises(UnsafeCheckpointError, match="with non-int arguments"):
        restricted_loads(bad, TIMEDELTA, "td")


REFUSED = [
    ("code", h.code_call(), "os.system, which is not on the allowlist"),
    ("called reference", h.pickle_of(h.glob("datetime", "timedelta") + h.EMPTY_TUPLE + h.REDUCE), None),
    ("cycle", h.cycle(), "contains itself"),
    ("deep", h.deep_nesting(200), "more than 100 levels"),
    ("reference bomb", h.dag_bomb(60), "reference bomb"),
    ("persistent id", h.pickle_of(h.uni("x") + h.BINPERSID), "persistent objects"),
    ("INST", b"(i__main__\nX\n.", "instantiates a class by name"),
    ("BUILD on a list", h.pickle_of(h.EMPTY_LIST + h.EMPTY_DICT + h.BUILD), "may not have state set"),
    ("SETITEM on a list", h.pickle_of(h.EMPTY_LIST + h.uni("k") + h.uni("v") + h.SETITEM), "sets an item of"),
]


@pytest.mark.parametrize(("data", "pattern"), [pytest.param(*c[1:], id=c[0]) for c in REFUSED])
def test_refused(data, pattern):
    policy = PicklePolicy(globals={"datetime.timedelta": GlobalRule()})  # a reference, never a call
    with pytest.raises(UnsafeCheckpointError, match=pattern or "may only be referred to") as info:
        scan_pickle(data, policy, "the file")
    assert "refusing to load the file" in str(info.value)


CORRUPT = [
    ("empty", b""),
    ("random", h.random_bytes(100)),
    ("no STOP", h.PROTO2 + h.EMPTY_LIST),
    ("memo never stored", h.pickle_of(h.get(7))),
    ("pop from empty stack", h.pickle_of(h.APPEND)),
    ("odd dict", h.pickle_of(h.MARK + h.uni("k") + b"d")),
]


@pytest.mark.parametrize("data", [pytest.param(c[1], id=c[0]) for c in CORRUPT])
def test_malformed_pickles_are_corrupt(data):
    with pytest.raises(CorruptCheckpointError, match="cannot read the file"):
        scan_pickle(data, PLAIN, "the file")


def test_bounds_on_bytes_opcodes_and_nodes():
    data = pickle.dumps(list(range(1000)), protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="more than the 100 bytes"):
        scan_pickle(data, PicklePolicy(globals={}, max_bytes=100), "f")
    with pytest.raises(UnsafeCheckpointError, match="more than 500 opcodes"):
        scan_pickle(data, PicklePolicy(globals={}, max_ops=500), "f")
    shared = [list(range(100))] * 50  # 50 references to one list: 5000 nodes from ~110 opcodes
    result = scan_pickle(pickle.dumps(shared, protocol=2), PLAIN, "f")
    assert result.tree_nodes == 1 + 50 * 101
    with pytest.raises(UnsafeCheckpointError, match="reference bomb"):
        scan_pickle(pickle.dumps(shared, protocol=2), PicklePolicy(globals={}, max_tree_nodes=1000), "f")


@dataclasses.dataclass
class ChunkMeta:
    """Stands in for the dataclasses torch.distributed.checkpoint pickles into `.metadata`."""

    offsets: tuple
    sizes: tuple


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_allowlisted_dataclasses_load_through_newobj_and_build(protocol):
    value = {"w": [ChunkMeta((0, 0), (4, 4)), ChunkMeta((4, 0), (4, 4))]}
    data = pickle.dumps(value, protocol=protocol)
    name = f"{__name__}.ChunkMeta"
    policy = PicklePolicy(globals={name: GlobalRule(new=True, build=True)})
    assert restricted_loads(data, policy, "meta") == value
    with pytest.raises(UnsafeCheckpointError, match="may not be instantiated"):
        restricted_loads(data, PicklePolicy(globals={name: GlobalRule(build=True)}), "meta")
