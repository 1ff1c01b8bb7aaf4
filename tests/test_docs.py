"""The documentation cannot drift from the product.

* docs/configuration.md documents every key of the run config, and nothing the config does not have: the
  pydantic models are walked from ``RunConfig`` (sections, nested sections, list entries), so a key added
  to, renamed in or removed from the code fails here until the reference follows.
* README.md stays a short page for users, and every relative link in it and in docs/ reaches a file (and,
  for links into a markdown file, a heading of that file).
* The pages describe the product, not how the work on it was organised.
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from globopt.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG_REFERENCE = DOCS / "configuration.md"
README = ROOT / "README.md"
CHANGELOG = ROOT / "CHANGELOG.md"
README_MAX_LINES = 250


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# -- the configuration reference ---------------------------------------------------------------------------
def _nested_models(annotation: object) -> list[tuple[type[BaseModel], str]]:
    """Models inside a field's annotation, each with the path suffix its keys get ('.' or '[].')."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, ".")]
    origin = typing.get_origin(annotation)
    found = []
    for argument in typing.get_args(annotation):
        for model, suffix in _nested_models(argument):
            # list entries are written `section[].key`; Optional / Union / Annotated add nothing to the path
            found.append((model, "[]." if origin in (list, tuple, set, frozenset) else suffix))
    return found


def config_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> set[str]:
    """Every dotted key of the run config: sections themselves and everything inside them."""
    keys = set()
    for name, field in model.model_fields.items():
        path = prefix + name
        keys.add(path)
        for nested, suffix in _nested_models(field.annotation):
            keys |= config_keys(nested, path + suffix)
    return keys


def documented_keys(text: str) -> list[str]:
    """First-column keys of the reference's key tables (tables whose header's first cell is 'key')."""
    keys: list[str] = []
    in_key_table = False
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if not cells:
            in_key_table = False
        elif cells[0] == "key":
            in_key_table = True
        elif in_key_table and not set(cells[0]) <= set("-: "):
            match = re.fullmatch(r"`([^`]+)`", cells[0])
            assert match, f"configuration.md: key-table row without a `dotted.key` first cell: {line}"
            keys.append(match.group(1))
    return keys


def test_the_walk_sees_nested_sections_and_list_entries() -> None:
    keys = config_keys()
    assert {"relax.fmax", "surrogate.early_stop.margin", "objectives[].goal"} <= keys
    assert {"htvs.templates[].prototype", "htvs.probability.threshold", "htvs.partial[].supercell"} <= keys


def test_every_config_key_is_documented() -> None:
    missing = sorted(config_keys() - set(documented_keys(CONFIG_REFERENCE.read_text())))
    assert not missing, f"keys of the run config missing from docs/configuration.md: {missing}"


def test_every_documented_key_exists() -> None:
    documented = documented_keys(CONFIG_REFERENCE.read_text())
    unknown = sorted(set(documented) - config_keys())
    assert not unknown, f"docs/configuration.md documents keys the run config does not have: {unknown}"
    repeated = sorted({key for key in documented if documented.count(key) > 1})
    assert not repeated, f"docs/configuration.md documents these keys twice: {repeated}"


# -- README size and links ---------------------------------------------------------------------------------
def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it at most {README_MAX_LINES}"


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def _links(text: str) -> list[str]:
    """Link targets outside fenced code blocks and inline code."""
    text = _FENCE.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)
    return _LINK.findall(text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in _FENCE.sub("", path.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in _links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        if not destination.exists():
            broken.append(f"{target} (no file {os.path.relpath(destination, ROOT)})")
        elif anchor and destination.suffix == ".md" and anchor not in _anchors(destination):
            broken.append(f"{target} (no heading #{anchor} in {destination.name})")
    return broken


@pytest.mark.parametrize("page", [*_pages(), CHANGELOG], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert page.exists(), f"{page} is missing"
    broken = _broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _links(README.read_text())}
    unlinked = sorted(p.name for p in DOCS.glob("*.md") if p.resolve() not in linked)
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


# -- the pages speak of the product ------------------------------------------------------------------------
_ORGANISATION = re.compile(r"\b(stop|session|issue|round|milestone|sprint)s?\s+#?[0-9]+\b", re.IGNORECASE)


@pytest.mark.parametrize("page", [*_pages(), CHANGELOG], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_words_about_how_the_work_was_organised(page: Path) -> None:
    hits = [
        f"line {number}: {match.group(0)!r}"
        for number, line in enumerate(page.read_text().splitlines(), 1)
        for match in _ORGANISATION.finditer(line)
    ]
    assert not hits, f"{page.relative_to(ROOT)} speaks of how the work was organised: {hits}"
