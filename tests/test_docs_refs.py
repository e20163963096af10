"""Every method reference in the code resolves inside the repository.

Code, tests, benchmarks, prompts and specs cite the method notes as ``docs/method.md#anchor``; the
anchors are the explicit ``<a id="...">`` tags of docs/method.md. These tests fail when such a link
names an anchor that does not exist, when docs/method.md links to a missing anchor of its own, or
when a reference to a document that is not in the repository (the study notes, the design notes,
their lettered section numbers) is left anywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SCANNED_DIRS = ("medsae", "tests", "bench", "prompts", "experiments")
SUFFIXES = {".py", ".j2", ".yaml", ".yml", ".md", ".txt", ".toml", ".cfg"}

ANCHOR_TAG = re.compile(r"""<a\s+(?:id|name)=["']([^"']+)["']""")
INTERNAL_LINK = re.compile(r"\]\(#([^)\s]+)\)")
METHOD_LINK = re.compile(r"(?<![\w-])(?:docs/)?method\.md#([A-Za-z0-9_-]+)")
#: Documents that live outside the repository, and the section numbering that only they define.
#: (Written so that this file does not match itself: the section sign is an escape.)
EXTERNAL_REFERENCE = re.compile(
    "|".join(
        [
            r"study-method\.md",
            r"autointerp-and-registry\.md",
            r"existing-sae-tools\.md",
            r"(?<![\w/-])design\.md",
            "\u00a7",  # section sign
            r"\(A[0-9]+\)",  # a lettered section in parentheses
            r"\bA[0-9]+\.[0-9]+\b",  # a lettered section with a sub-number
            r"\bAppendix [A-D]\b",
            r"\b[Ss]ection A?[0-9]",  # the word section followed by its number
        ]
    )
)


def scanned_files() -> list[Path]:
    """Text files of the scanned folders plus the top-level markdown files; never this file."""
    files = sorted(ROOT.glob("*.md"))
    for folder in SCANNED_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                files.append(path)
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


def lines_of(path: Path) -> list[tuple[int, str]]:
    return list(enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1))


def method_anchors() -> list[str]:
    return ANCHOR_TAG.findall(METHOD.read_text(encoding="utf-8"))


def test_method_notes_have_unique_anchors_and_their_own_links_resolve():
    anchors = method_anchors()
    assert len(anchors) >= 20, "docs/method.md lost its <a id=...> anchors"
    duplicates = sorted({a for a in anchors if anchors.count(a) > 1})
    assert not duplicates, f"docs/method.md: duplicate anchors {duplicates}"
    broken = [
        f"docs/method.md:{n}: #{target}"
        for n, line in lines_of(METHOD)
        for target in INTERNAL_LINK.findall(line)
        if target not in anchors
    ]
    assert not broken, "links to missing anchors:\n" + "\n".join(broken)


def test_every_method_link_in_the_code_names_an_existing_anchor():
    anchors = set(method_anchors())
    broken = [
        f"{path.relative_to(ROOT)}:{n}: #{anchor}"
        for path in scanned_files()
        for n, line in lines_of(path)
        for anchor in METHOD_LINK.findall(line)
        if anchor not in anchors
    ]
    assert not broken, "docs/method.md has no such anchor:\n" + "\n".join(broken)


def test_no_reference_to_a_document_outside_the_repository_remains():
    left = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in scanned_files()
        for n, line in lines_of(path)
        if EXTERNAL_REFERENCE.search(line)
    ]
    assert not left, "references to documents not in the repository (cite docs/method.md#anchor):\n" + "\n".join(left)
