"""The options table: every command-line option is declared once, as metadata on the field of the typed
settings it sets (the way Hugging Face's TrainingArguments declares its options on its dataclass fields).

A field made with `opt(default, help, ...)` is an option. From the table come the click options (cli.py),
the range and choice checks of the settings (`check`), which options a `--resume` may change and which need
a GPU (run_dir), and the option tables of the docs (scripts/option_docs.py writes them, tests/test_docs.py
checks them, so that they cannot drift).
The type, the choices (a Literal) and the default are the field's own.

Imports nothing heavy: building the CLI and its help must not load torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from dalipipe.errors import DataError

_SPEC = "dalipipe.option"


@dataclass(frozen=True)
class Spec:
    """What the table says of one option beyond its field's type and default."""

    help: str
    flag: str | None = None  # without the dashes; None: the field's name with dashes
    default_text: str | None = None  # shown as [default: ...] where the value alone would mislead
    metavar: str | None = None
    # Bounds, checked for a value given (None is "not set" and never out of range).
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    why: str = ""  # said after the bound in the error ("for training (BatchNorm ...)")
    resume: bool = False  # a --resume may change it (every other setting stays the run's)
    gpu_values: tuple = ()  # values that need a GPU (a resume elsewhere drops them, a new run is refused)
    path: str | None = None  # a path: "file", "existing file" (one that must exist) or "folder"
    required: bool = False  # the command needs it (no default)
    switch: bool = False  # an on/off flag without a --no- form (--force): off unless given
    section: str = "reference"  # for the docs' tables: "reference" or "beyond" (beyond the reference recipe)


def opt(default: Any, help: str, **spec: Any) -> Any:
    """A settings field that is a command-line option."""
    return dataclasses.field(default=default, metadata={_SPEC: Spec(help, **spec)})


@dataclass(frozen=True)
class Option:
    """One row of the table: a settings field (at `path` inside its settings) and its Spec."""

    path: tuple[str, ...]
    spec: Spec
    type: type  # bool, int, float or str
    choices: tuple[str, ...] | None
    default: Any

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def flag(self) -> str:
        return "--" + (self.spec.flag or self.name.replace("_", "-"))

    @property
    def on_off(self) -> bool:
        """Given as --x or --no-x (a switch such as --force has no --no- form)."""
        return self.type is bool and not self.spec.switch

    @property
    def spelling(self) -> str:
        """As the messages write it: --[no-]x for an on/off option."""
        return f"--[no-]{self.flag[2:]}" if self.on_off else self.flag

    @property
    def listed(self) -> str:
        """As the README's lists write it: the spelling, then the choices (--loader dali|torch)."""
        return self.spelling + (" " + "|".join(self.choices) if self.choices else "")

    def default_shown(self) -> str:
        if self.spec.default_text is not None:
            return self.spec.default_text
        if self.type is bool:
            return "on" if self.default else "off"
        if self.default is None:
            return "none"
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    def bound_error(self, value: Any) -> str | None:
        """The one-line error for a value out of this option's bounds or choices, else None."""
        s = self.spec
        if value is None:
            return None
        if self.choices and value not in self.choices:
            return f"{self.flag} must be one of {', '.join(self.choices)}, got '{value}'"
        low_ok = s.low is None or (value > s.low if s.low_open else value >= s.low)
        high_ok = s.high is None or (value < s.high if s.high_open else value <= s.high)
        if low_ok and high_ok:
            return None
        if s.high is None:
            bound = ("positive" if s.low_open else "non-negative") if s.low == 0 else f"at least {_num(s.low)}"
        elif s.low is None:
            bound = f"below {_num(s.high)}" if s.high_open else f"at most {_num(s.high)}"
        elif s.low_open and s.high_open:
            bound = f"between {_num(s.low)} and {_num(s.high)}"
        else:
            bound = f"in {'(' if s.low_open else '['}{_num(s.low)}, {_num(s.high)}{')' if s.high_open else ']'}"
        return f"{self.flag} must be {bound}{' ' + s.why if s.why else ''}, got {_given(value)}"


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _given(x: Any) -> str:
    """A value as a user writes it: `--lr 0` is 0, not Python's 0.0."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x) if isinstance(x, float) else str(x)


def spoken(value: Any) -> str:
    """A setting's value in a message, as a user would say it: on/off, not set, 0 rather than 0.0."""
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "on" if value else "off"
    return _given(value)


def table(cls: type) -> list[Option]:
    """The options of a settings class, in declaration order; the fields of a nested settings dataclass
    (TrainConfig's augment) are its options too."""
    return _walk(cls, ())


def _walk(cls: type, prefix: tuple[str, ...]) -> list[Option]:
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if _SPEC not in f.metadata:
            if dataclasses.is_dataclass(kind):
                rows += _walk(kind, prefix + (f.name,))
            continue
        base, choices = _base_type(kind)
        rows.append(Option(prefix + (f.name,), f.metadata[_SPEC], base, choices, f.default))
    return rows


def _base_type(kind: Any) -> tuple[type, tuple[str, ...] | None]:
    """int | None -> int; a Literal of strings -> (str, its values)."""
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(kind) if a is not type(None)] if union else [kind]
    (one,) = args
    if typing.get_origin(one) is Literal:
        return str, typing.get_args(one)
    return one, None


def find(cls: type, name: str) -> Option:
    for o in table(cls):
        if o.name == name:
            return o
    raise KeyError(name)


def check(settings: Any) -> None:
    """Every option's bounds and choices, in table order: the first value out of them is a DataError."""
    for o in table(type(settings)):
        value = settings
        for part in o.path:
            value = getattr(value, part)
        error = o.bound_error(value)
        if error:
            raise DataError(error)


def spoken_list(spellings: list[str]) -> str:
    """`a`, `b` and `c`."""
    quoted = [f"`{s}`" for s in spellings]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
