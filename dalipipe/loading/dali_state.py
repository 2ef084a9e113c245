"""A DALI pipeline state saved before the pipeline's graph changed, made fit for the graph as it is now.

DALI saves a pipeline's state (pipe.checkpoint()) as one entry per operator, keyed by the operator's name,
and restores it only into a graph with exactly the same operator names: one operator more or fewer, and it
refuses the whole state ("There's no checkpoint for operator ..."). A run saved by an earlier release could
then not be resumed with the DALI loader once its graph gained a step (the antialiased shrink of large
images did). Most operators keep no state (their entry is empty); only the readers (their position and
shuffle) and the random generators do. So a saved state is matched to the current graph's fresh one:
operators in both keep the saved state, operators only in one of them must be stateless there.

The serialized form is protobuf: top-level field 1 repeated, one message per operator (field 1 its name,
field 2 its state bytes), then DALI's other fields (the iterator's context), kept as they are.
"""

from __future__ import annotations

from dalipipe.errors import DataError

_OPERATOR = 1  # top-level field number of an operator's entry
_LENGTH_DELIMITED = 2
_FIXED = {1: 8, 5: 4}  # protobuf wire types of fixed width: 64 and 32 bits


def fit(saved: bytes, fresh: bytes) -> bytes:
    """`saved` with an empty state for each operator that only `fresh` (the current graph's state, as built)
    has and that keeps none there, and without the stateless operators the graph no longer has. Raises
    DataError when an operator that keeps state is in one and not in the other: its state would be lost.
    A state this module cannot read (a future DALI's form) is returned as it is, for DALI to judge."""
    try:
        saved_ops, rest = _split(saved)
        fresh_ops, _ = _split(fresh)
    except ValueError:
        return saved
    if saved_ops.keys() == fresh_ops.keys():
        return saved
    lost = [name for name in saved_ops.keys() - fresh_ops.keys() if _state(saved_ops[name])]
    new = [name for name in fresh_ops.keys() - saved_ops.keys() if _state(fresh_ops[name])]
    if lost or new:
        raise DataError("the run's DALI loader state was saved by a dalipipe whose pipeline differs in its random "
                        f"operators ({', '.join(sorted(lost + new))}); resume it with the dalipipe that saved it, "
                        "or with --loader torch")
    out = bytearray()
    for name, entry in fresh_ops.items():  # the current graph's operators, in its order
        out += _field(_OPERATOR, saved_ops.get(name, entry))
    return bytes(out + rest)


def _split(blob: bytes) -> tuple[dict[str, bytes], bytes]:
    """({operator name: its entry's bytes}, the other top-level fields as they were)."""
    ops, rest = {}, bytearray()
    for number, value, whole in _fields(blob):
        if number == _OPERATOR:
            if value is None:
                raise ValueError("an operator entry that is not a message")
            ops[_name(value)] = value
        else:
            rest += whole
    return ops, bytes(rest)


def _fields(blob: bytes):
    """(field number, value, the field's bytes) of each field of a message; a value is bytes for the
    length-delimited fields (all that DALI writes here), None for the others (skipped). ValueError where the
    bytes are not a message."""
    i = 0
    while i < len(blob):
        start = i
        key, i = _varint(blob, i)
        kind, value = key & 7, None
        if kind == _LENGTH_DELIMITED:
            n, i = _varint(blob, i)
            value, i = blob[i:i + n], i + n
        elif kind == 0:
            _, i = _varint(blob, i)
        elif kind in _FIXED:
            i += _FIXED[kind]
        else:
            raise ValueError(f"wire type {kind}")
        if i > len(blob):
            raise ValueError("truncated")
        yield key >> 3, value, blob[start:i]


def _name(entry: bytes) -> str:
    names = [value for number, value, _ in _fields(entry) if number == 1 and value is not None]
    if len(names) != 1:
        raise ValueError("an operator entry without its name")
    return names[0].decode()


def _state(entry: bytes) -> bytes:
    return next((value for number, value, _ in _fields(entry) if number == 2 and value is not None), b"")


def _varint(blob: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(blob):
            raise ValueError("truncated")
        byte = blob[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _field(number: int, value: bytes) -> bytes:
    out, n = bytearray([number << 3 | _LENGTH_DELIMITED]), len(value)
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + value
