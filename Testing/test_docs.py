"""The documentation speaks about the product: where each text is, that its links and figures hold,
and that no work log is left in docs, comments or tests.

* README: the two commands first, then one current results table; sections in the order Install,
  Tutorial, Results, Troubleshooting, Developers; its first table's figures are those of docs/results.md.
* docs/results.md: every topic names the benchmark command and the model version; the Speed sections
  (README and results) carry the marker another change replaces them by.
* CHANGELOG.md and the model card have a section for every bundled model; CONTRIBUTING.md names every
  package of the library and only test files that exist; docs/benchmarks.md names every benchmark.
* Relative links and their #anchors resolve.
* No citation of when a figure was obtained (an ordinal before the word for a work period) and no work-log headings.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "docs" / "results.md"
CHANGELOG = REPO / "CHANGELOG.md"
CONTRIBUTING = REPO / "CONTRIBUTING.md"
MODEL_CARD = REPO / "Resources" / "Models" / "README.md"
LIB = REPO / "Speckle2Self" / "Speckle2SelfLib"
DOCS = [README, CHANGELOG, CONTRIBUTING, MODEL_CARD, *sorted((REPO / "docs").glob("*.md"))]

SPEED_MARKER = "<!-- speed table: updated by #33 -->"
ORDINALS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|"
            "thirteenth|fourteenth|fifteenth|this|that|next|last|previous|earlier")
#: An ordinal (or "this", "last", ...) before the word for a work period, also across a comment's
#: line break: a citation of when a figure was obtained, not of the benchmark that gives it.
SESSION_CITATION = re.compile(rf"\b({ORDINALS})\b[\"'#:\s]*session\b", re.IGNORECASE)


def headings(text: str):
    return [(len(m.group(1)), m.group(2).strip()) for m in re.finditer(r"^(#{1,6}) (.+)$", text, re.MULTILINE)
            if not _in_code_block(text, m.start())]


def _in_code_block(text: str, pos: int) -> bool:
    return text[:pos].count("\n```") % 2 == 1


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower())
    return text.replace(" ", "-")


def tracked_text_files():
    listed = subprocess.run(["git", "ls-files", "-c", "-o", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    suffixes = {".py", ".sh", ".md", ".json", ".toml", ".ui", ".txt", ".cfg", ".s4ext"}
    for name in listed:
        path = REPO / name
        if name and path.suffix in suffixes and path.is_file() and path.name != Path(__file__).name:
            yield name, path.read_text(errors="replace")


# ----------------------------------------------------------------------------- README

def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[0] == "# Speckle2Self for 3D Slicer" and lines[2] == "```bash"
    assert lines[3].startswith("bash scripts/run_demo.sh     # ")
    assert lines[4].startswith("bash scripts/run_tests.sh    # ")


def first_table(text: str) -> str:
    match = re.search(r"((?:^\|.*\|\n)+)", text, re.MULTILINE)
    assert match, "no table"
    return match.group(1)


def test_readme_first_screen_shows_the_current_results_table_of_docs_results():
    text = README.read_text()
    first_screen = "\n".join(text.splitlines()[:40])
    table = first_table(first_screen)
    assert "v4" in table.splitlines()[0], "the table names the model version"
    figures = set(re.findall(r"\d+\.\d{3}", table))
    assert len(figures) >= 12
    results = RESULTS.read_text()
    assert not sorted(f for f in figures if f not in results), "every figure on the first screen is in docs/results.md"


def test_readme_sections_are_install_tutorial_results_troubleshooting_developers():
    top = [h for level, h in headings(README.read_text()) if level == 2]
    assert top == ["Install", "Tutorial", "Results", "Troubleshooting", "Developers"]
    tutorial = README.read_text().split("## Tutorial", 1)[1].split("## Results", 1)[0]
    for part in ("In 3D Slicer", "Python console", "Command line"):
        assert f"### {part}" in tutorial or part in "".join(h for _, h in headings(tutorial))


def test_readme_results_give_the_command_of_every_figure():
    results = README.read_text().split("## Results", 1)[1].split("### Speed", 1)[0]
    rows = [r for r in first_table(results).splitlines()[2:]]
    assert len(rows) >= 8
    assert all(r.rstrip("|").rsplit("|", 1)[1].strip() for r in rows), "every row has a command (or 'the same')"
    assert "python benchmarks/" in rows[0]


def test_speed_sections_carry_the_marker_that_replaces_them():
    for path, heading in ((README, "### Speed"), (RESULTS, "## Speed")):
        text = path.read_text()
        found = re.search(rf"^{re.escape(heading)}$", text, re.MULTILINE)
        assert found, path
        section = text[found.end():]
        assert section.lstrip().startswith(SPEED_MARKER), path


# ----------------------------------------------------------------------------- results, changelog, model card

def test_every_results_topic_names_its_command_and_model_version():
    sections = re.split(r"^## ", RESULTS.read_text(), flags=re.MULTILINE)[1:]
    assert len(sections) >= 6
    for section in sections:
        title = section.splitlines()[0]
        assert "python benchmarks/" in section, title
        assert re.search(r"\bv[1-4]\b", section), title


def bundled_entries():
    return json.loads((REPO / "Resources" / "Models" / "models.json").read_text())["models"]


@pytest.mark.parametrize("path", [CHANGELOG, MODEL_CARD], ids=["CHANGELOG", "model card"])
def test_every_bundled_model_has_a_section(path):
    titles = [h for level, h in headings(path.read_text()) if level == 2]
    for entry in bundled_entries():
        assert any(re.search(rf"\b{re.escape(entry['name'])}\b(?!-)", t) for t in titles), (path.name, entry["name"])


def test_no_dated_work_log_headings():
    for path in DOCS:
        for _level, title in headings(path.read_text()):
            assert not re.search(r"\b20\d\d-\d\d-\d\d\b", title), f"{path.name}: {title}"


# ----------------------------------------------------------------------------- contributing, benchmarks index

def test_contributing_names_every_package_and_only_tests_that_exist():
    text = CONTRIBUTING.read_text()
    parts = [p.name + "/" for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    parts += [p.name for p in LIB.glob("*.py") if p.name != "__init__.py"]
    assert not [p for p in parts if p not in text], "every package and module of the library is in the map"
    named = set(re.findall(r"\btest_[a-z0-9_]+\.py\b", text))
    assert len(named) >= 20
    assert not sorted(n for n in named if not (REPO / "Testing" / n).is_file())
    for rule in ("test_layers.py", "register_model.py", "Resources/Models", "benchmarks/"):
        assert rule in text


def test_the_benchmarks_index_names_every_benchmark():
    text = (REPO / "docs" / "benchmarks.md").read_text()
    scripts = [p.name for p in (REPO / "benchmarks").glob("*.py")]
    assert scripts and not [s for s in scripts if f"`{s}`" not in text]


# ----------------------------------------------------------------------------- links

def test_relative_links_and_anchors_resolve():
    broken = []
    for path in DOCS:
        text = path.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{path.name}: {target}")
            elif anchor and dest.suffix == ".md":
                if anchor not in {slug(h) for _, h in headings(dest.read_text())}:
                    broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, broken


# ----------------------------------------------------------------------------- no work log

def test_no_session_citations():
    citing = set()
    for name, text in tracked_text_files():
        if SESSION_CITATION.search(text):
            citing.add(name)
        if name.endswith(".md"):
            assert not re.search(r"(?<!gpu_)session", text, re.IGNORECASE), f"{name} speaks of sessions"
    assert not citing, sorted(citing)


@pytest.mark.parametrize("ordinal", ["Ninth", "twelfth", "this"])
def test_the_citation_pattern_finds_citations_and_only_citations(ordinal):
    word = "session"
    assert SESSION_CITATION.search(f'(docs/x.md, "{ordinal}\n#: {word}")')
    assert SESSION_CITATION.search(f"since the {ordinal} {word}'s run")
    assert not SESSION_CITATION.search('@pytest.fixture(scope="session")')
    assert not SESSION_CITATION.search("bash scripts/gpu_session.sh --prepare")
