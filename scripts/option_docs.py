"""The option lists of the docs, generated from the options table (dalipipe/options.py).

A page marks each generated list with two comments, and everything between them is this script's:

    <!-- options:train -->
    ...
    <!-- /options -->

    python scripts/option_docs.py            # rewrite the lists in README.md and docs/*.md
    python scripts/option_docs.py --check    # exit 1, naming them, when a list differs from the table

tests/test_options_table.py runs the check, so an option added, removed or reworded in the table without
running this script fails the tests.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dalipipe import options  # noqa: E402
from dalipipe.config import TrainConfig, may_change_text  # noqa: E402
from dalipipe.settings import CheckSettings, PredictSettings, PreviewSettings, SynthSpec  # noqa: E402

BLOCK = re.compile(r"(<!-- options:([a-z-]+) -->\n)(.*?)(<!-- /options -->)", re.S)


def _cell(text: str) -> str:
    """Text inside a Markdown table cell: a pipe would end the cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _value(o: options.Option) -> str:
    """What follows the flag, as `--help` writes it: --epochs INTEGER, --weights FILE, --ema DECAY."""
    if o.spec.metavar:
        return " " + o.spec.metavar
    if o.type is bool or o.choices:
        return ""
    return " " + ("FILE" if o.spec.path else {int: "INTEGER", float: "FLOAT"}.get(o.type, "TEXT"))


def _table(cls: type, section: str | None = None, resume_column: bool = False) -> str:
    head = ["option", "default", "what it does"] + (["`--resume` may change it"] if resume_column else [])
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for o in options.table(cls):
        if section is not None and o.spec.section != section:
            continue
        name = o.listed + _value(o)
        default = "required" if o.spec.required else o.default_shown()
        cells = [f"`{name}`", default, o.spec.help]
        if resume_column:
            cells.append("yes" if o.spec.resume else "no")
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows) + "\n"


def _resume_rule() -> str:
    return f"On `--resume`, {may_change_text()} may change; every other option keeps the run's value.\n"


# Each block a page may hold, by the name in its opening comment.
BLOCKS = {
    "train": lambda: _table(TrainConfig, "reference", resume_column=True),
    "train-beyond": lambda: _table(TrainConfig, "beyond", resume_column=True),
    "resume": _resume_rule,
    "predict": lambda: _table(PredictSettings),
    "preview": lambda: _table(PreviewSettings),
    "check": lambda: _table(CheckSettings),
    "synth": lambda: _table(SynthSpec),
}


def pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def render(text: str, where: str = "") -> str:
    """The text with every generated block as the table makes it now."""
    def fill(m: re.Match) -> str:
        if m.group(2) not in BLOCKS:
            raise SystemExit(f"{where}: unknown options block '{m.group(2)}' (known: {', '.join(BLOCKS)})")
        return m.group(1) + BLOCKS[m.group(2)]() + m.group(4)

    return BLOCK.sub(fill, text)


def stale() -> list[str]:
    """The pages whose generated blocks differ from the table, with the names of those blocks."""
    found = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        fresh = render(text, str(page))
        if fresh != text:
            old = dict((m.group(2), m.group(3)) for m in BLOCK.finditer(text))
            names = [m.group(2) for m in BLOCK.finditer(fresh) if old.get(m.group(2)) != m.group(3)]
            found.append(f"{page.relative_to(ROOT)}: {', '.join(names)}")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a block is stale")
    args = ap.parse_args()
    found = stale()
    if args.check:
        for line in found:
            print(f"stale options block: {line} (run: python scripts/option_docs.py)")
        return 1 if found else 0
    for page in pages():
        text = page.read_text(encoding="utf-8")
        fresh = render(text, str(page))
        if fresh != text:
            page.write_text(fresh, encoding="utf-8")
    for line in found:
        print(f"rewrote {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
