"""A walk over a pickle's opcodes, before anything unpickles it, refusing streams that would cost memory.

Unpicklers trust the numbers a pickle carries. CPython's C unpickler keeps its memo in an array and grows
it to whatever index a PUT names, so a 5 KB pickle whose LONG_BINPUT says 600,000,000 costs gigabytes; a
BINUNICODE8 or BINBYTES8 length makes `read(n)` on a real file preallocate n bytes; a deep MARK nesting
or millions of opcodes cost memory and time in proportion. `pickletools.genops` reads the opcodes
without building anything, over a source that holds only the pickle (an in-memory `data.pkl`, or a
copy of a memory-mapped legacy file's bytes up to the pickle-size cap), so its own reads are bounded by
the bytes really there. Each opcode is then held to:

- the opcodes torch's `weights_only` unpickler implements (protocol 2: no FRAME, BINBYTES8, BINUNICODE8,
  ...). The load is that unpickler, which refuses every other opcode, so refusing them here first loses
  no file torch could read and bounds every length field at 4 bytes (the refusal comes at the end of
  the walk, so that a plain protocol-4 pickle is refused by the name of the global it would call);
- memo indices: picklers number memo entries consecutively from 0, so a PUT may name an entry already
  stored or the next one, never more; a GET must name a stored one;
- `MAX_MARK_DEPTH` nested MARKs (the deepest official checkpoint needs 3), `MAX_OPCODES` opcodes (an SD
  checkpoint with its EMA copy has ~50,000) and `MAX_PICKLE_BYTES` bytes of pickle;
- string and bytes lengths no longer than what remains of the stream (genops raises on a short read).

What passes costs the unpicklers memory and time in proportion to its opcodes: measured at the caps
(2,000,000 opcodes of dicts or memo entries, or a 60 MB string), under 200 MB above the process and 4-6 s.
The walk costs ~0.45 µs an opcode: ~30 ms for a 2,300-tensor checkpoint (74,000 opcodes), against
~240 ms for torch.load of it. `MAX_TENSORS` bounds the tensors of either format.
"""
from __future__ import annotations

import pickletools
from typing import Any, Callable

from weights.errors import CheckpointError

MAX_PICKLE_BYTES = 64 * 2**20  # an SD checkpoint's data.pkl is ~200 KB; with optimizer state a few MB
MAX_OPCODES = 2_000_000
MAX_MARK_DEPTH = 128
# Tensors in one file, either format: SD 1.x/2.x checkpoints hold ~1,100 (~2,300 with EMA, a few
# thousand with optimizer state). Each costs ~1 KB of Python and torch objects whatever its size, so
# a file of a million empty tensors would cost a gigabyte.
MAX_TENSORS = 100_000

# Every opcode torch/_weights_only_unpickler.py implements; it answers any other with "Unsupported operand".
TORCH_OPCODES = frozenset({
    "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK", "TUPLE",
    "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT",
    "EMPTY_SET", "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINPERSID",
    "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT", "LONG1", "PROTO", "STOP",
})
# What the walk does with each opcode, decided once per opcode rather than once per occurrence.
_OTHER, _MARK, _ENDS_MARK, _PUT, _MEMOIZE, _GET, _GLOBAL, _STACK_GLOBAL, _STOP, _SILENT = range(10)


def _kind(op: pickletools.OpcodeInfo) -> int:
    special = {"MARK": _MARK, "BINPUT": _PUT, "LONG_BINPUT": _PUT, "PUT": _PUT, "MEMOIZE": _MEMOIZE,
               "BINGET": _GET, "LONG_BINGET": _GET, "GET": _GET, "GLOBAL": _GLOBAL, "INST": _GLOBAL,
               "STACK_GLOBAL": _STACK_GLOBAL, "STOP": _STOP}
    if op.name in special:
        return special[op.name]
    if pickletools.markobject in op.stack_before:
        return _ENDS_MARK
    return _OTHER if op.stack_before or op.stack_after else _SILENT  # PROTO and FRAME touch no stack


_KINDS = {op: (_kind(op), op.name in TORCH_OPCODES) for op in pickletools.opcodes}


class SourceEnded(CheckpointError):
    """The walk could not read an opcode or its argument: the pickle is cut short (or garbled) where the
    source ends, which may be only where the caller's window ends."""


def check_pickle(source: Any, path: str, what: str = "pickle", judge: Callable[[str, str], None] | None = None,
                 max_opcodes: int = MAX_OPCODES) -> int:
    """Walk one pickle in `source` (bytes, or a file object that ends where the pickle must) up to its STOP; returns the position after STOP. CheckpointError at the first opcode that breaks a limit
    above, or where the source ends first.

    `judge(module, name)` sees each global the pickle names and raises to refuse it. An opcode torch does not
    implement is refused at the end of the walk rather than where it stands, so that a plain pickle
    (protocol 4 opens with FRAME) is refused by the name of the global it would call, which says more."""
    n_ops = depth = memo = 0
    strings: dict[int, str] = {}  # memo index -> string, to name protocol 4's STACK_GLOBAL
    before = last = None  # the last two values pushed, where they were strings
    foreign = None  # the first opcode torch does not implement
    kinds = _KINDS
    try:
        for op, arg, pos in pickletools.genops(source):
            kind, ours = kinds[op]
            n_ops += 1
            if n_ops > max_opcodes:
                raise CheckpointError(f"refusing to load: its {what} has more than {max_opcodes:,} opcodes "
                                      "(a checkpoint has tens of thousands)", path)
            if not ours and foreign is None:
                foreign = f"the {op.name} opcode at byte {pos}"
            if kind == _OTHER:
                before, last = last, arg if type(arg) is str else None
            elif kind == _PUT or kind == _MEMOIZE:  # leaves the stack as it was
                index = memo if kind == _MEMOIZE else arg
                if index > memo:
                    raise CheckpointError(f"refusing to load: its {what} stores memo entry {index:,} at byte {pos} "
                                          f"when only {memo:,} exist (a memory bomb?)", path)
                memo += index == memo
                if last is not None:
                    strings[index] = last
            elif kind == _GET:
                if arg >= memo:
                    raise CheckpointError(f"corrupt {what}: byte {pos} reads memo entry {arg:,}, never stored; "
                                          "download it again", path)
                before, last = last, strings.get(arg)
            elif kind == _MARK:
                depth += 1
                if depth > MAX_MARK_DEPTH:
                    raise CheckpointError(f"refusing to load: its {what} nests more than {MAX_MARK_DEPTH} "
                                          f"levels deep (byte {pos})", path)
                before = last = None
            elif kind == _ENDS_MARK:
                if depth == 0:
                    raise CheckpointError(f"corrupt {what}: {op.name} at byte {pos} without a MARK; download it "
                                          "again", path)
                depth -= 1
                before = last = None
            elif kind == _GLOBAL or kind == _STACK_GLOBAL:
                if judge is not None and kind == _GLOBAL:
                    judge(*arg.split(" ", 1))
                elif judge is not None and before is not None and last is not None:
                    judge(before, last)
                before = last = None
            elif kind == _STOP:
                if foreign is not None:
                    raise CheckpointError(f"refusing to load: its {what} uses {foreign}, which torch's restricted "
                                          "unpickler does not implement", path)
                return pos + 1
    except CheckpointError:
        raise
    except (ValueError, EOFError) as e:  # genops: a length past the end, a bad argument, no STOP
        raise SourceEnded(f"corrupt or truncated {what} ({str(e)[:200]}), or one over the "
                              f"{MAX_PICKLE_BYTES // 2**20} MB a pickle may take; download it again", path) from None
    raise CheckpointError(f"truncated {what} (no STOP); download it again", path)
