"""The documentation agrees with the code: the operator reference is what the registry says,
every page is in the site's navigation, and the README stays a front door."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from difforge.platform.opdoc import reference_markdown

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def test_the_operator_reference_is_generated_from_the_registry():
    page = (DOCS / "reference" / "operators.md").read_text()
    assert page == reference_markdown(), "run `python docs/gen_reference.py` and commit the page"
    # nested params show their choices (a Literal's values), not a default dict
    assert "`finetune.method` | one of: full, lora, difffit, bias" in page


def _nav_pages(node) -> set[str]:
    if isinstance(node, str):
        return {node} if node.endswith(".md") else set()
    if isinstance(node, dict):
        return set().union(*(_nav_pages(v) for v in node.values()))
    return set().union(*(_nav_pages(v) for v in node)) if node else set()


def test_every_page_is_in_the_navigation_and_every_link_in_the_readme_resolves():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert _nav_pages(config["nav"]) == pages
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250, "README.md is the front door: link to docs/ instead"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
