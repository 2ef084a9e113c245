"""The README and the pages in docs/ say what the code does: their option lists are the options table's own
(scripts/option_docs.py), every option they name exists, and their relative links lead to files."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from dalipipe import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def option_docs():
    spec = importlib.util.spec_from_file_location("option_docs", ROOT / "scripts" / "option_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md",
            *sorted(DOCS.glob("*.md"))]


def test_the_option_lists_of_the_docs_are_the_tables_own():
    """A new option, or a changed default or help text, fails here until `python scripts/option_docs.py`
    has rewritten the lists."""
    stale = option_docs().stale()
    assert not stale, f"stale option lists: {stale}; run: python scripts/option_docs.py"


def test_the_check_finds_a_list_that_lacks_a_row(tmp_path, monkeypatch):
    """The check itself: a page whose predict list lacks a row (or is empty) is stale, and rewriting it
    lists every predict option."""
    from dalipipe import options
    from dalipipe.settings import PredictSettings

    module = option_docs()
    fresh = module.render("<!-- options:predict -->\n<!-- /options -->\n")
    assert all(f"`{o.listed}".replace("|", "\\|") in fresh for o in options.table(PredictSettings)), fresh
    page = tmp_path / "page.md"
    page.write_text(fresh.replace(fresh.splitlines()[4] + "\n", ""))
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "pages", lambda: [page])
    assert module.stale() == ["page.md: predict"]


def test_every_option_list_the_generator_makes_is_in_the_docs():
    """A list removed with its markers would not be stale, only gone."""
    blocks = option_docs().BLOCK
    found = [m.group(2) for page in pages() for m in blocks.finditer(page.read_text(encoding="utf-8"))]
    assert sorted(found) == sorted(option_docs().BLOCKS), found


def _dalipipe_flags() -> set[str]:
    flags = {"--help"}
    for command in cli.cli.commands.values():
        for p in command.params:
            flags |= set(getattr(p, "opts", ())) | set(getattr(p, "secondary_opts", ()))
    return flags


# Flags of other programs the pages name: torchrun, pip, tensorboard, the benchmarks and scripts.
OTHER_FLAGS = {
    "--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint",
    "--index-url", "--only-binary", "--python-version", "--implementation", "--platform", "--no-deps",
    "--no-index", "--find-links", "--logdir",
    "--budget-s", "--steps", "--work", "--quick", "--train", "--sweep", "--rows", "--limit", "--json",
    "--profile", "--profile-steps", "--settings", "--fsync-delay", "--data", "--repeats", "--busy",
    "--check", "--list", "--stale", "--source-sizes", "--gpu-step-rate", "--projected-cores",
}


def test_the_docs_name_no_option_that_does_not_exist():
    """An option renamed or removed in the table leaves no page naming the old one."""
    known = _dalipipe_flags() | OTHER_FLAGS
    unknown = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        for flag in set(re.findall(r"(?<![\w-])--(?:\[no-\])?[a-z][a-z0-9_-]*", text)):
            if flag.replace("[no-]", "") not in known and not (
                    flag.startswith("--[no-]") and "--no-" + flag[7:] in known):
                unknown.append(f"{page.relative_to(ROOT)}: {flag}")
    assert not unknown, f"options no command has (a flag of another program: add it to OTHER_FLAGS): {unknown}"


def test_the_relative_links_of_the_docs_lead_to_files_and_headings():
    """Links as GitHub resolves them: relative to the page, and an #anchor to a heading of the target."""
    broken = []
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_the_readme_stays_short():
    """A newcomer reads it in five minutes; the detail belongs to a page in docs/."""
    readme = (ROOT / "README.md").read_bytes()
    assert readme.count(b"\n") <= 200 and len(readme) <= 16 * 1024, (readme.count(b"\n"), len(readme))
