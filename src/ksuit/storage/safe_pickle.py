"""A restricted pickle scanner: what a pickle would build, checked without running any of it.

Unpickling is a small stack machine, and its instructions can call any function a pickle
names. `torch.load(weights_only=True)` restricts the functions, but a 400-byte pickle can still
ask an allowed one for `bytearray(1_500_000_000)`, and a 2 KB pickle can share references so
that the object it builds, walked as a tree (by `repr`, `json.dumps`, any recursive walker),
has 2**60 nodes. So before anything is unpickled, `scan_pickle` runs the stack machine
*symbolically* over the opcodes (`pickletools.genops`; nothing is imported or called) and
refuses, naming the source:

- globals outside the policy's allowlist, and allowed globals used in a way the policy does
  not allow (called, instantiated, or given arguments its check refuses);
- persistent ids, unless the policy checks them (torch's storages);
- opcodes that import, call or read out-of-band data outside that model (INST, OBJ, EXT*,
  PERSID, NEXT_BUFFER, READONLY_BUFFER) and protocols above the policy's;
- sizes beyond the policy's bounds: bytes, opcodes, nesting depth, and the number of nodes a
  walker visits (shared references counted each time they are reached), and cycles.

Malformed pickles (truncated, unknown opcodes, stack or memo misuse) are
`CorruptCheckpointError`; policy refusals are `UnsafeCheckpointError`.

`restricted_loads` then unpickles a scanned pickle with the standard unpickler, resolving only
allowlisted globals: a general way to read a pickle ksuit did not write (e.g. the `.metadata`
of torch.distributed.checkpoint) through an allowlist.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import pickle
import pickletools
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError

ArgCheck = Callable[[tuple[Any, ...]], "str | None"]


@dataclass(frozen=True)
class GlobalRule:
    """What a pickle may do with one allowlisted global (by default: only refer to it)."""

    call: bool = False  # REDUCE: global(*args)
    new: bool = False  # NEWOBJ: global.__new__(global, *args)
    build: bool = False  # BUILD (set state) on what the call or new returned
    mapping: bool = False  # SETITEM(S) on what the call returned (an OrderedDict)
    leaf: bool = False  # what it returns is one value to walkers (a tensor), not a container
    check_args: ArgCheck | None = None  # a problem with the (symbolic) arguments, or None


@dataclass(frozen=True)
class PicklePolicy:
    """An allowlist of globals plus the bounds a pickle must stay within."""

    globals: Mapping[str, GlobalRule]
    max_bytes: int = 64 << 20
    max_ops: int = 16_000_000
    max_depth: int = 100
    # walkers may visit max(max_tree_nodes, max_amplification * opcodes) nodes
    max_tree_nodes: int = 1 << 22
    max_amplification: int = 16
    max_protocol: int = pickle.HIGHEST_PROTOCOL
    persistent_id: Callable[[Any], str | None] | None = None  # None: persistent ids are refused
    hint: str = ""  # appended to refusals: what to do about it


class Node:
    """A value the pickle builds: a container, a global, or what calling a global returns.

    `kind` is `list`, `dict`, `tuple`, `set`, `frozenset`, `global`, `object` or `persistent`;
    `name` the global's dotted name (for `global` and `object`); `children` what it holds
    (for `object`: the call's arguments, then items and state set on it later).
    """

    __slots__ = ("kind", "name", "children", "leaf")

    def __init__(self, kind: str, name: str = "", children: list[Any] | None = None, leaf: bool = False):
        self.kind = kind
        self.name = name
        self.children = children if children is not None else []
        self.leaf = leaf

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name}>" if self.name else f"<{self.kind}>"


# --- helpers for argument checks ---------------------------------------------------------


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def items_of(value: Any, kind: str = "tuple") -> list[Any] | None:
    """The items of a symbolic tuple (list, ...), or None if `value` is not one."""
    return value.children if isinstance(value, Node) and value.kind == kind else None


def global_name(value: Any) -> str | None:
    return value.name if isinstance(value, Node) and value.kind == "global" else None


def object_name(value: Any) -> str | None:
    """The global whose call built `value`, or None."""
    return value.name if isinstance(value, Node) and value.kind == "object" else None


def to_python(value: Any, limit: int = 64) -> Any:
    """A symbolic tuple of constants (and globals, as their dotted names) as a Python tuple."""
    items = items_of(value)
    if items is not None:
        if len(items) > limit:
            raise ValueError(f"tuple of {len(items)} items")
        return tuple(to_python(v, limit) for v in items)
    if isinstance(value, Node):
        return value.name if value.kind == "global" else value
    return value


@dataclass
class ScanResult:
    protocol: int = 0
    ops: int = 0
    tree_nodes: int = 0
    depth: int = 0
    globals: set[str] = field(default_factory=set)
    persistent_ids: list[Any] = field(default_factory=list)  # each as `to_python` gives it


class _Refused(Exception):
    def __init__(self, message: str, corrupt: bool = False):
        super().__init__(message)
        self.corrupt = corrupt


def _unsafe(message: str) -> _Refused:
    return _Refused(message)


def _corrupt(message: str) -> _Refused:
    return _Refused(message, corrupt=True)


def _resolve_global_name(module: str, name: str) -> str:
    """The dotted name as Python 3 sees it (protocol 2 writes `__builtin__`, `copy_reg`)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


_CONSTANTS = frozenset(
    "BININT BININT1 BININT2 INT LONG LONG1 LONG4 BINFLOAT FLOAT BINUNICODE SHORT_BINUNICODE "
    "BINUNICODE8 UNICODE BINSTRING SHORT_BINSTRING STRING BINBYTES SHORT_BINBYTES BINBYTES8".split()
)
_REFUSED_OPS = {
    "INST": "instantiates a class by name",
    "OBJ": "instantiates a class",
    "EXT1": "uses the extension registry",
    "EXT2": "uses the extension registry",
    "EXT4": "uses the extension registry",
    "PERSID": "uses a text persistent id",
    "NEXT_BUFFER": "reads out-of-band buffers",
    "READONLY_BUFFER": "reads out-of-band buffers",
}


class _Machine:
    def __init__(self, policy: PicklePolicy):
        self.policy = policy
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.result = ScanResult()

    # -- stack helpers
    def pop(self) -> Any:
        if not self.stack:
            raise _corrupt("pops from an empty stack")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise _corrupt("reads an empty stack")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise _corrupt("has no mark to pop to")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def rule(self, node: Any, what: str) -> GlobalRule:
        name = global_name(node)
        if name is None:
            raise _unsafe(f"{what} something that is not a global ({node!r})")
        return self.policy.globals[name]

    # -- the opcodes that matter
    def do_global(self, module: str, name: str) -> None:
        if not isinstance(module, str) or not isinstance(name, str):
            raise _corrupt("names a global with a non-string module or name")
        dotted = _resolve_global_name(module, name)
        if dotted not in self.policy.globals:
            raise _unsafe(f"it refers to {dotted}, which is not on the allowlist")
        self.result.globals.add(dotted)
        self.stack.append(Node("global", dotted, leaf=True))

    def do_call(self, kind: str) -> None:
        args = self.pop()
        func = self.pop() if kind == "NEWOBJ" else self.top()
        rule = self.rule(func, "calls")
        if kind == "REDUCE" and not rule.call:
            raise _unsafe(f"it calls {func.name}, which may only be referred to")
        if kind == "NEWOBJ" and not rule.new:
            raise _unsafe(f"it instantiates {func.name}, which may not be instantiated")
        arg_items = items_of(args)
        if arg_items is None:
            raise _unsafe(f"it calls {func.name} with arguments that are not a tuple")
        if rule.check_args is not None:
            problem = rule.check_args(tuple(arg_items))
            if problem:
                raise _unsafe(f"it calls {func.name} with {problem}")
        node = Node("object", func.name, list(arg_items), leaf=rule.leaf)
        if kind == "NEWOBJ":
            self.stack.append(node)
        else:
            self.stack[-1] = node

    def do_build(self) -> None:
        state = self.pop()
        inst = self.top()
        name = object_name(inst)
        if name is None or not self.policy.globals[name].build:
            raise _unsafe(f"it sets the state of {inst!r}, which may not have state set")
        if items_of(state, "dict") is None and items_of(state, "tuple") is None:
            raise _unsafe(f"it sets the state of {name} from a {state!r}")
        inst.children.append(state)

    def container(self, kinds: tuple[str, ...], what: str) -> Node:
        target = self.top()
        if isinstance(target, Node):
            if target.kind in kinds:
                return target
            if "dict" in kinds and target.kind == "object" and self.policy.globals[target.name].mapping:
                return target
        raise _unsafe(f"it {what} {target!r}")

    def persistent(self) -> None:
        pid = self.pop()
        check = self.policy.persistent_id
        if check is None:
            raise _unsafe("it refers to persistent objects, which this kind of file never holds")
        problem = check(pid)
        if problem:
            raise _unsafe(f"it has a persistent id {problem}")
        try:
            self.result.persistent_ids.append(to_python(pid))
        except ValueError as e:
            raise _unsafe(f"it has a persistent id that is a {e}") from None
        self.stack.append(Node("persistent", leaf=True, children=[pid]))

    def memo_get(self, index: Any) -> None:
        if index not in self.memo:
            raise _corrupt(f"reads memo entry {index!r}, which was never stored")
        self.stack.append(self.memo[index])

    def memo_put(self, index: Any) -> None:
        if not is_int(index) or index < 0:
            raise _corrupt(f"stores memo entry {index!r}")
        self.memo[index] = self.top()

    # -- one handler per opcode (name -> handler(arg))
    def table(self) -> dict[str, Callable[[Any], object]]:
        push = self.push
        handlers: dict[str, Callable[[Any], object]] = dict.fromkeys(_CONSTANTS, push)
        handlers.update(
            {
                "BINPUT": self.memo_put,
                "LONG_BINPUT": self.memo_put,
                "PUT": self.memo_put,
                "MEMOIZE": lambda _: self.memo_put(len(self.memo)),
                "BINGET": self.memo_get,
                "LONG_BINGET": self.memo_get,
                "GET": self.memo_get,
                "BYTEARRAY8": lambda arg: push(bytes(arg)),
                "NONE": lambda _: push(None),
                "NEWTRUE": lambda _: push(True),
                "NEWFALSE": lambda _: push(False),
                "MARK": self.mark,
                "EMPTY_TUPLE": lambda _: push(Node("tuple")),
                "TUPLE1": lambda _: self.small_tuple(1),
                "TUPLE2": lambda _: self.small_tuple(2),
                "TUPLE3": lambda _: self.small_tuple(3),
                "TUPLE": lambda _: push(Node("tuple", children=self.pop_mark())),
                "LIST": lambda _: push(Node("list", children=self.pop_mark())),
                "FROZENSET": lambda _: push(Node("frozenset", children=self.pop_mark())),
                "DICT": lambda _: push(Node("dict", children=self.pairs("builds a dict"))),
                "EMPTY_LIST": lambda _: push(Node("list")),
                "EMPTY_DICT": lambda _: push(Node("dict")),
                "EMPTY_SET": lambda _: push(Node("set")),
                "APPEND": lambda _: self.add(("list",), "appends to", [self.pop()]),
                "APPENDS": lambda _: self.add(("list",), "appends to", self.pop_mark()),
                "SETITEM": lambda _: self.add(("dict",), "sets an item of", self.popn(2)),
                "SETITEMS": lambda _: self.add(("dict",), "sets items of", self.pairs("sets items")),
                "ADDITEMS": lambda _: self.add(("set",), "adds items to", self.pop_mark()),
                "GLOBAL": lambda arg: self.do_global(*str(arg).partition(" ")[::2]),
                "STACK_GLOBAL": lambda _: self.do_global(*self.popn(2)),
                "REDUCE": lambda _: self.do_call("REDUCE"),
                "NEWOBJ": lambda _: self.do_call("NEWOBJ"),
                "NEWOBJ_EX": self.newobj_ex,
                "BUILD": lambda _: self.do_build(),
                "BINPERSID": lambda _: self.persistent(),
                "DUP": lambda _: push(self.top()),
                "POP": lambda _: self.pop() if self.stack else self.pop_mark(),
                "POP_MARK": lambda _: self.pop_mark(),
                "PROTO": self.proto,
                "FRAME": lambda _: None,
            }
        )
        return handlers

    def push(self, value: Any) -> None:
        self.stack.append(value)

    def mark(self, _: Any) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def popn(self, n: int) -> list[Any]:
        return [self.pop() for _ in range(n)][::-1]

    def small_tuple(self, n: int) -> None:
        self.stack.append(Node("tuple", children=self.popn(n)))

    def pairs(self, what: str) -> list[Any]:
        items = self.pop_mark()
        if len(items) % 2:
            raise _corrupt(f"{what} from an odd number of values")
        return items

    def add(self, kinds: tuple[str, ...], what: str, items: list[Any]) -> None:
        self.container(kinds, what).children.extend(items)

    def newobj_ex(self, _: Any) -> None:
        if items_of(self.pop(), "dict") != []:
            raise _unsafe("it instantiates a class with keyword arguments")
        self.do_call("NEWOBJ")

    def proto(self, arg: int) -> None:
        self.result.protocol = arg
        if arg > self.policy.max_protocol:
            raise _unsafe(f"it uses pickle protocol {arg}; at most {self.policy.max_protocol} is read")


_CODES = {op.code.encode("latin-1")[0]: op for op in pickletools.opcodes}
_NO_ARG = {code: op.name for code, op in _CODES.items() if op.arg is None}
_UINT = {ord("q"): ("BINPUT", 1), ord("h"): ("BINGET", 1), ord("K"): ("BININT1", 1)}
_STRUCT = {
    ord("r"): ("LONG_BINPUT", struct.Struct("<I")),
    ord("j"): ("LONG_BINGET", struct.Struct("<I")),
    ord("J"): ("BININT", struct.Struct("<i")),
    ord("M"): ("BININT2", struct.Struct("<H")),
    ord("G"): ("BINFLOAT", struct.Struct(">d")),
}


def _opcodes(data: bytes) -> Iterator[tuple[str, Any]]:
    """`(opcode name, argument)` of each instruction, as `pickletools.genops` gives them (whose
    readers decode the rare opcodes), with the frequent ones decoded inline for speed."""
    stream = io.BytesIO(data)
    end, pos = len(data), 0
    while pos < end:
        code = data[pos]
        pos += 1
        if code in _NO_ARG:
            yield _NO_ARG[code], None
        elif code in _UINT:
            if pos >= end:
                break
            yield _UINT[code][0], data[pos]
            pos += 1
        elif code in _STRUCT:
            name, fmt = _STRUCT[code]
            if pos + fmt.size > end:
                break
            yield name, fmt.unpack_from(data, pos)[0]
            pos += fmt.size
        elif code == 0x58:  # BINUNICODE
            if pos + 4 > end or pos + 4 + int.from_bytes(data[pos : pos + 4], "little") > end:
                break
            n = int.from_bytes(data[pos : pos + 4], "little")
            yield "BINUNICODE", str(data[pos + 4 : pos + 4 + n], "utf-8", "surrogatepass")
            pos += 4 + n
        elif code in _CODES:
            op = _CODES[code]
            stream.seek(pos)
            assert op.arg is not None  # _CODES holds only opcodes with an argument
            yield op.name, op.arg.reader(stream)
            pos = stream.tell()
        else:
            raise ValueError(f"unknown opcode {code:#04x} at byte {pos - 1}")
    raise ValueError("the pickle ends before its STOP opcode")


def _measure(root: Any, policy: PicklePolicy, ops: int) -> tuple[int, int]:
    """`(nodes a tree walk visits, nesting depth)` of the built value, without walking it as a
    tree: shared nodes are measured once. Refuses cycles and values beyond the bounds."""
    limit = max(policy.max_tree_nodes, policy.max_amplification * ops)
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    entered: set[int] = set()
    todo: list[tuple[Any, bool]] = [(root, False)]
    while todo:
        node, leaving = todo.pop()
        if not isinstance(node, Node):
            continue
        key = id(node)
        if leaving:
            size, depth = 1, 1
            if not node.leaf:
                for child in node.children:
                    if isinstance(child, Node):
                        size += sizes[id(child)]
                        depth = max(depth, depths[id(child)] + 1)
                    else:
                        size += 1
                        depth = max(depth, 2)
            if depth > policy.max_depth:
                raise _unsafe(f"it nests values more than {policy.max_depth} levels deep")
            sizes[key], depths[key] = min(size, limit + 1), depth
            continue
        if key in sizes:
            continue
        if key in entered:
            raise _unsafe("it builds a value that contains itself (a reference cycle)")
        entered.add(key)
        todo.append((node, True))
        if not node.leaf:
            todo.extend((child, False) for child in node.children if isinstance(child, Node))
    total = sizes.get(id(root), 1)
    if total > limit:
        raise _unsafe(
            f"its shared references make a value of more than {limit} nodes to walk "
            f"from {ops} opcodes (a reference bomb)"
        )
    return total, depths.get(id(root), 1)


def scan_pickle(data: bytes | memoryview, policy: PicklePolicy, source: str) -> ScanResult:
    """Checks a pickle against `policy` without unpickling it (see the module docstring).

    Raises `UnsafeCheckpointError` or `CorruptCheckpointError`, both naming `source`.
    """
    if len(data) > policy.max_bytes:
        raise UnsafeCheckpointError(
            f"refusing to load {source}: its pickle is {len(data)} bytes, more than the "
            f"{policy.max_bytes} bytes allowed{policy.hint}"
        )
    machine = _Machine(policy)
    handlers = machine.table()
    ops = 0
    try:
        for name, arg in _opcodes(bytes(data)):
            ops += 1
            if ops > policy.max_ops:
                raise _unsafe(f"it has more than {policy.max_ops} opcodes")
            if name == "STOP":
                break
            handler = handlers.get(name)
            if handler is None:
                raise _unsafe(
                    f"it {_REFUSED_OPS.get(name, 'uses an opcode ksuit does not read')} (opcode {name})"
                )
            handler(arg)
        else:
            raise _corrupt("it ends before its STOP opcode")
        root = machine.pop()
        machine.result.ops = ops
        machine.result.tree_nodes, machine.result.depth = _measure(root, policy, ops)
    except _Refused as e:
        if e.corrupt:
            raise CorruptCheckpointError(f"cannot read {source}: its pickle is corrupt ({e})") from None
        raise UnsafeCheckpointError(f"refusing to load {source}: {e}{policy.hint}") from None
    except (ValueError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as e:
        # pickletools' own errors: truncated data, unknown opcode, bad arguments
        raise CorruptCheckpointError(
            f"cannot read {source}: it is not a valid pickle ({str(e).splitlines()[0] if str(e) else e!r})"
        ) from None
    return machine.result


class _AllowlistUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, policy: PicklePolicy):
        super().__init__(file)
        self._policy = policy

    def find_class(self, module: str, name: str) -> Any:
        dotted = _resolve_global_name(module, name)
        if dotted not in self._policy.globals:  # scan_pickle refused it already; belt and braces
            raise pickle.UnpicklingError(f"global {dotted} is not on the allowlist")
        module_name, _, attr = dotted.rpartition(".")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not supported")


def restricted_loads(data: bytes, policy: PicklePolicy, source: str) -> Any:
    """Scans `data` with `scan_pickle`, then unpickles it resolving only allowlisted globals."""
    scan_pickle(data, policy, source)
    try:
        return _AllowlistUnpickler(io.BytesIO(data), policy).load()
    except Exception as e:  # what an allowlisted global raises on bad arguments
        raise CorruptCheckpointError(f"cannot read {source}: {type(e).__name__}: {e}") from None
