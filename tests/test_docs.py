"""The docs: a site that builds offline and strictly, a README that stays a front page, a nav
that lists every page, links that lead somewhere, and a config reference that is current and
describes every key.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import yaml

from busway import default_registry
from busway._config.schema import config_reference, undocumented_keys
from tests.support import REPO

DOCS = REPO / "docs"
README = REPO / "README.md"
README_MAX_LINES = 300
# Plugins that build without the network (material's `social` fetches fonts, `privacy`
# downloads external assets, `optimize` needs image tools): keep the build offline.
OFFLINE_PLUGINS = {"search", "tags"}


class _Loader(yaml.SafeLoader):
    """mkdocs.yml as data: `!!python/name:...` tags (the mermaid fence) stay plain strings."""


_Loader.add_multi_constructor(
    "tag:yaml.org,2002:python/name:", lambda loader, suffix, node: f"python/name:{suffix}"
)


def _mkdocs_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=_Loader)
    return config


def _nav_pages(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return []


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_the_site_builds_strictly_and_offline(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("mkdocs and mkdocs-material must be installed in CI (the test extra)")
        pytest.skip("mkdocs / mkdocs-material not installed: pip install -e '.[docs]'")
    plugins = {
        name
        for entry in _mkdocs_config().get("plugins", [])
        for name in (entry if isinstance(entry, dict) else {entry: None})
    }
    assert plugins <= OFFLINE_PLUGINS, (
        f"plugins that may need the network: {plugins - OFFLINE_PLUGINS}"
    )
    site = tmp_path / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(REPO / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    architecture = (site / "architecture" / "index.html").read_text()
    assert '<pre class="mermaid"><code>flowchart LR' in architecture
    assert (site / "reference" / "config" / "index.html").exists()


def test_the_readme_is_a_front_page_with_the_ci_test_command() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the detail into docs/"
    )
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command.startswith("python3 -m venv .venv")
    assert ci_command in lines, "README's 'Run the tests' command must be the one .ci/run runs"


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    nav = _nav_pages(_mkdocs_config()["nav"])
    pages = {page.relative_to(DOCS).as_posix() for page in _pages()}
    assert sorted(set(nav) - pages) == [], "nav entries without a page"
    assert sorted(pages - set(nav)) == [], "pages missing from the nav in mkdocs.yml"
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"


_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} (.+?)\s*$", re.M)
_ANCHOR = re.compile(r"\{#([\w-]+)\}\s*$")


def _slug(heading: str) -> str:
    """The id Python-Markdown's toc gives a heading (its default slugify)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    anchors = set()
    for heading in _HEADING.findall(text):
        explicit = _ANCHOR.search(heading)
        anchors.add(explicit.group(1) if explicit else _slug(heading))
    return anchors


def _broken_links(page: Path) -> list[str]:
    text = _CODE.sub("", _FENCE.sub("", page.read_text()))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto: ... are not ours to check
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in _anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.name}")
    return broken


@pytest.mark.parametrize(
    "page", [README, *_pages()], ids=lambda page: page.relative_to(REPO).as_posix()
)
def test_internal_links_resolve(page: Path) -> None:
    assert _broken_links(page) == []


def test_the_config_reference_page_is_current() -> None:
    page = DOCS / "reference" / "config.md"
    assert page.exists() and page.read_text() == config_reference(default_registry()), (
        "docs/reference/config.md is stale: run "
        "`busway schema --update-docs docs/reference/config.md`"
    )


def test_every_config_key_has_a_description() -> None:
    missing = undocumented_keys(default_registry())
    assert missing == [], (
        "config keys without a description (add a docstring right below the field):\n"
        + "\n".join(missing)
    )
