"""The docs cannot go stale silently: docs/params.md names exactly the keys of params.yaml, every
docs/ page is linked from README.md, and every relative link in README.md and docs/ resolves."""

from __future__ import annotations

import re
from typing import Any

import yaml

from imgpipe.params import PipelineParams
from tests.support import ROOT

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

# A Markdown link or image, [text](target) or ![alt](target); the target has no spaces.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A table row's first cell, and each backticked key in it.
FIRST_CELL = re.compile(r"^\|([^|]*)\|")
KEY = re.compile(r"`([^`]+)`")
PLACEHOLDER = re.compile(r"<[^>.]+>")


def user_named_sections() -> set[str]:
    """Sections of params.yaml whose keys the user names (views, models), per imgpipe/params.py."""
    return {
        name
        for name, field in PipelineParams.model_fields.items()
        if getattr(field.annotation, "__origin__", None) is dict
    }


def params_keys(node: Any, prefix: str = "", user_named: frozenset[str] = frozenset()) -> set[str]:
    """Leaf keys of a params mapping, dotted; a user-named key becomes the placeholder `<*>`."""
    keys: set[str] = set()
    for name, value in node.items():
        key = f"{prefix}.<*>" if prefix in user_named else f"{prefix}.{name}".lstrip(".")
        if isinstance(value, dict):
            keys |= params_keys(value, key, user_named)
        else:
            keys.add(key)
    return keys


def documented_keys(text: str) -> set[str]:
    """Keys in the first column of docs/params.md's tables, placeholders written as `<*>`."""
    keys: set[str] = set()
    for line in text.splitlines():
        cell = FIRST_CELL.match(line)
        if cell is not None:  # the header and separator rows hold no backticks
            keys |= {PLACEHOLDER.sub("<*>", key) for key in KEY.findall(cell.group(1))}
    return keys


def without_code(text: str) -> str:
    """Markdown text with fenced code blocks and inline code removed (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as -."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for heading in re.findall(
        r"^#+ (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M
    ):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def test_params_md_names_every_key_of_params_yaml_and_no_other() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    expected = params_keys(params, user_named=frozenset(user_named_sections()))
    documented = documented_keys((DOCS / "params.md").read_text(encoding="utf-8"))
    missing = sorted(expected - documented)
    unknown = sorted(documented - expected)
    assert not missing, f"params.yaml keys missing from docs/params.md: {', '.join(missing)}"
    assert not unknown, f"docs/params.md names keys params.yaml lacks: {', '.join(unknown)}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = without_code((ROOT / "README.md").read_text(encoding="utf-8"))
    linked = {target.split("#", 1)[0] for target in LINK.findall(readme)}
    unlinked = [
        f"docs/{page.name}" for page in DOCS.glob("*.md") if f"docs/{page.name}" not in linked
    ]
    assert not unlinked, f"README.md does not link: {', '.join(sorted(unlinked))}"


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(without_code(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not file.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text("utf-8")):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
