"""Every reference-document citation in the repository resolves in a fresh clone.

The specifications the code is written from live in ``docs/spec/`` (see its README). This test
scans the repository's ``.py``, ``.md`` and ``.sh`` files (not ``runs/``, ``.git``, caches,
build outputs or virtual environments) and fails, naming ``file:line``, for

* a path outside the repository: the sibling ``shared`` folder of the development
  machine (relative, absolute, or its ``docs/`` sub-folder);
* the bare name of one of the project's internal notes (``frad-et-spec``, ``molspectra-spec``,
  ``jax-notes``, ``perf-notes``, ``data-notes``, ``published-results``) instead of a
  ``docs/spec/<file>.md`` path, since a user's clone has no such file;
* a ``docs/spec/<file>.md`` citation (or a Markdown link into ``docs/spec/``) of a file that does
  not exist, or followed by a section (``§2.4``, ``§4.1–§4.2``) that has no heading there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC_DIR = REPO / "docs" / "spec"
SCANNED_SUFFIXES = (".py", ".md", ".sh")
SKIPPED_DIRS = {".git", "runs", "__pycache__", "build", "dist", "node_modules"}

# "../shared", or the development folder's notes reached by any path ("<anything>/shared/docs/").
# A user's own shared filesystem ("/mnt/shared/qm9s") is fine, and so is the provenance note of
# copied golden files, which names where they came from.
OUTSIDE_PATH = re.compile(r"\.\./shared\b|\bshared/docs/")
# A note name not preceded by a path: "docs/spec/data-notes.md" is fine, "data-notes.md §1" is not.
INTERNAL_NOTE = re.compile(
    r"(?<![\w/.-])"
    r"(frad-et-spec|molspectra-spec|jax-notes|perf-notes|data-notes|published-results)"
    r"(?![\w-])"
)
SPEC_PATH = re.compile(r"docs/spec/([\w.-]+\.md)")
MD_LINK = re.compile(r"\]\(([^)\s#]+\.md)(?:#[^)\s]*)?\)")
# Section references right after a citation: "§2.4", "§4.1–§4.2", "§3.2 and §6.5", "§1, §3"
SECTION_RUN = re.compile(
    r"[`'\")\]]*\s*"  # closing quotes, brackets
    r"((?:§\s?\d+(?:\.\d+)*(?:\s*(?:,|and|to|–|-)\s*(?=§))?)+)"
)
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")
HEADING_NUMBER = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def scanned_files(root: Path) -> list[Path]:
    """The repository's .py/.md/.sh files, without run outputs, caches and environments."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in SKIPPED_DIRS and not d.startswith(".") and not d.endswith(".egg-info")
            and not (Path(dirpath, d) / "pyvenv.cfg").exists()
        )
        found += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(SCANNED_SUFFIXES)]
    return found


def spec_sections(path: Path) -> set[str]:
    """Numbers of a spec page's headings: "## 2. Data" gives "2", "### 2.4 Order" gives "2.4"."""
    return set(HEADING_NUMBER.findall(path.read_text(encoding="utf-8")))


def _check_target(target: Path, text: str, end: int, where: str, cited: str) -> list[str]:
    """A cited spec file must exist, and every section cited right after it must be a heading."""
    if not target.is_file():
        return [f"{where}: cites {cited}, which does not exist"]
    run = SECTION_RUN.match(text, end)
    if not run:
        return []
    known = spec_sections(target)
    return [f"{where}: cites {cited} §{s}, which has no such section heading"
            for s in SECTION.findall(run.group(1)) if s not in known]


def citation_problems(path: Path, root: Path = REPO) -> list[str]:
    """``file:line: fault`` for each unresolvable citation in one file."""
    rel = path.relative_to(root).as_posix()
    text = path.read_text(encoding="utf-8", errors="replace")
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    in_spec = path.parent == root / "docs" / "spec"
    problems = []
    for m in OUTSIDE_PATH.finditer(text):
        problems.append(f"{rel}:{line_of(m.start())}: cites {m.group(0)!r}, outside the repository")
    for m in INTERNAL_NOTE.finditer(text):
        if in_spec and (path.parent / f"{m.group(1)}.md").is_file():
            continue  # a relative reference between spec pages
        problems.append(f"{rel}:{line_of(m.start())}: cites the internal note {m.group(1)!r}; "
                        f"cite docs/spec/<file>.md instead")
    for m in SPEC_PATH.finditer(text):
        problems += _check_target(root / "docs" / "spec" / m.group(1), text, m.end(),
                                  f"{rel}:{line_of(m.start())}", m.group(0))
    if path.suffix == ".md":
        for m in MD_LINK.finditer(text):
            target = (path.parent / m.group(1)).resolve()
            if target.parent == (root / "docs" / "spec").resolve():
                problems += _check_target(target, text, m.end(),
                                          f"{rel}:{line_of(m.start())}", m.group(1))
    return problems


def test_every_spec_citation_resolves_in_the_repository():
    problems = [
        p for f in scanned_files(REPO)
        if f != Path(__file__).resolve()
        for p in citation_problems(f)
    ]
    assert not problems, "citations that do not resolve in a fresh clone:\n" + "\n".join(problems)


def test_spec_index_lists_every_spec_page():
    index = (SPEC_DIR / "README.md").read_text(encoding="utf-8")
    pages = sorted(p.name for p in SPEC_DIR.glob("*.md") if p.name != "README.md")
    assert pages, "docs/spec/ has no pages"
    missing = [p for p in pages if f"]({p})" not in index]
    assert not missing, f"docs/spec/README.md does not link {missing}"


def test_checker_flags_each_kind_of_broken_citation(tmp_path):
    """The scanner itself: each fault is reported with its line; good citations are not."""
    spec = tmp_path / "docs" / "spec"
    spec.mkdir(parents=True)
    (spec / "frad.md").write_text("# Frad\n## 2. Noise\n### 2.4 Order\n", encoding="utf-8")
    good = tmp_path / "good.py"
    good.write_text(
        '"""Written from ``docs/spec/frad.md`` §2.4 and §2 (see docs/spec/frad.md)."""\n',
        encoding="utf-8",
    )
    assert citation_problems(good, tmp_path) == []
    bad = tmp_path / "docs" / "bad.md"
    bad.write_text(
        "ok line\n"
        "see " + "../" + "shared/docs/frad-et-spec.md §2.4\n"  # split: not itself a citation
        "see `data-notes.md` §6.6\n"
        "see `docs/spec/frad.md` §2.4–§2.9\n"
        "see docs/spec/et.md\n"
        "see [the ET](spec/missing.md#x) and [Frad](spec/frad.md) §2.4\n",
        encoding="utf-8",
    )
    found = citation_problems(bad, tmp_path)
    expected = [
        ("docs/bad.md:2:", "outside the repository"),
        ("docs/bad.md:3:", "internal note 'data-notes'"),
        ("docs/bad.md:4:", "docs/spec/frad.md §2.9, which has no such section"),
        ("docs/bad.md:5:", "docs/spec/et.md, which does not exist"),
        ("docs/bad.md:6:", "spec/missing.md, which does not exist"),
    ]
    for prefix, fault in expected:
        assert any(p.startswith(prefix) and fault in p for p in found), (prefix, fault, found)
    assert len(found) == len(expected), found  # §2.4 exists, so it is not reported
