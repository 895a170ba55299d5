"""The README stays a short front page whose links into docs/ all lead somewhere (the docs site itself is
checked by ``make docs``, mkdocs --strict, in CI)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_BYTES = 12 * 1024

# [text](target) outside code; targets with a scheme (https:, mailto:) or only an anchor are not files
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def relative_links(markdown: str) -> list:
    """The link targets of ``markdown`` that name a file in the repository, anchors dropped."""
    text = _FENCE.sub("", markdown)
    out = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def test_readme_is_at_most_12_kib():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, (f"README.md is {size} bytes, over {MAX_README_BYTES}: move the detail into a "
                                      "page under docs/ and link it")


def test_every_readme_link_resolves_to_a_file():
    links = relative_links(README.read_text())
    docs_links = [t for t in links if t.startswith("docs/")]
    assert docs_links, "the README links no page of docs/"
    missing = [t for t in links if not (ROOT / t).is_file()]
    assert not missing, f"README.md links files that do not exist: {missing}"


def test_relative_links_finds_file_links_and_skips_urls_anchors_and_code():
    text = ("[a](docs/a.md) [b](docs/b.md#part) [c](https://x.org/y.md) [d](#here)\n"
            "```\n[e](docs/in_code.md)\n```\n[f](../up.md)")
    assert relative_links(text) == ["docs/a.md", "docs/b.md", "../up.md"]


def test_readme_setup_commands_are_makefile_targets():
    readme, makefile = README.read_text(), (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme, f"the README no longer shows `make {target}`"
        assert re.search(rf"^{target}:", makefile, re.M), f"the Makefile has no `{target}` target"
