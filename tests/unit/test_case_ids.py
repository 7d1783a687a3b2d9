"""The repository carries its own reference: every case id (T01–T64) and every `behaviour §N` a file cites
is defined in docs/behaviour.md, every `architecture "Heading"` names a heading of docs/architecture.md, and
no file points at notes that are not in the repository.

The scanner functions are tested on small texts first, so a change that makes them blind fails here too.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BEHAVIOUR = "docs/behaviour.md"
ARCHITECTURE = "docs/architecture.md"
SELF = "tests/unit/test_case_ids.py"  # its fixtures cite wrong things on purpose

# A case id is T and exactly two digits as a whole word (T1/T2 are SIP timers, "T0" a timestamp), or the
# ids a test's name starts with: test_t08_..., test_t02_t03_t04_validation.
_CASE = re.compile(r"(?<![\w])T(\d{2})(?![\w])")
_TEST_NAME = re.compile(r"\btest_((?:t\d{2}(?:_|\b))+)")
_TEST_ID = re.compile(r"t(\d{2})")
# `behaviour §3.1`, `behaviour.md §5.2/§6.2`, `behaviour §5.4, §6.4`, `behaviour §3.3 and §6.1`.
_SECTION_CITE = re.compile(
    r"\bbehaviour(?:\.md)?`? §(\d+(?:\.\d+)?)((?:\s*(?:,|/|and|or)\s*§\d+(?:\.\d+)?)*)"
)
_SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
# `architecture "Shared state in etcd"`, `docs/architecture.md` ("Networking and flow ownership").
_HEADING_CITE = re.compile(r"\barchitecture(?:\.md)?`?\s*\(?\"([^\"\n]+)\"")
# Notes that lived beside the checkout and are gone. Their names are put together here rather than written
# out, so that this file does not cite them itself. A bare name as a word is a citation too, unless it is a
# name in code (`X = ...`, `f(X, ...)`).
_NOTE_NAMES = tuple(name.upper() for name in ("spec", "design", "tooling"))
_OUTSIDE = "../" + "shared"
_FOREIGN = re.compile(rf"{re.escape(_OUTSIDE)}|\b(?:{'|'.join(_NOTE_NAMES)})\b(?:\.md)?(?!\s*[=,)])")
# In behaviour.md itself a bare § refers to its own sections, unless an RFC is named just before.
_RFC_SECTIONS = re.compile(r"RFC \d+,? §\d+(?:\.\d+)*(?:\s*(?:,|/|–|and)\s*§?\d+(?:\.\d+)*)*")
_DEFINED_CASE = re.compile(r"^\*\*T(\d{2}) ", re.M)
_HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)?)\.? ", re.M)
_ANY_HEADING = re.compile(r"^#{1,6} (.+?)\s*$", re.M)


def cited_cases(text: str) -> set[str]:
    """Case ids a text cites, as "T08"."""
    ids = {f"T{m}" for m in _CASE.findall(text)}
    for names in _TEST_NAME.findall(text):
        ids.update(f"T{m}" for m in _TEST_ID.findall(names))
    return ids


def cited_sections(text: str) -> set[str]:
    """Sections of docs/behaviour.md a text cites, as "5.2"."""
    found: set[str] = set()
    for first, more in _SECTION_CITE.findall(text):
        found.add(first)
        found.update(_SECTION.findall(more))
    return found


def own_sections(text: str) -> set[str]:
    """The § references inside docs/behaviour.md that point at its own sections (RFC sections left out)."""
    return set(_SECTION.findall(_RFC_SECTIONS.sub("", text)))


def cited_headings(text: str) -> set[str]:
    return set(_HEADING_CITE.findall(text))


def foreign_citations(text: str) -> list[str]:
    """Each line that cites notes outside the repository."""
    return [line.strip() for line in text.splitlines() if _FOREIGN.search(line)]


def defined_cases(behaviour: str) -> list[str]:
    return [f"T{m}" for m in _DEFINED_CASE.findall(behaviour)]


def defined_sections(behaviour: str) -> set[str]:
    return set(_HEADING.findall(behaviour))


def headings(markdown: str) -> set[str]:
    return set(_ANY_HEADING.findall(markdown))


def tracked_texts() -> dict[str, str]:
    """Every file of the checkout git knows of (tracked, or new and not ignored), binary files left out."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    texts: dict[str, str] = {}
    for name in filter(None, out.split("\0")):
        path = REPO / name
        if not path.is_file():
            continue  # deleted in the working tree
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def unresolved(texts: dict[str, str], behaviour: str, architecture: str) -> list[str]:
    """One line per citation that the reference does not define, or per file that cites outside notes."""
    cases, sections = set(defined_cases(behaviour)), defined_sections(behaviour)
    titles = headings(architecture)
    problems: list[str] = []
    for name, text in sorted(texts.items()):
        for case in sorted(cited_cases(text) - cases):
            problems.append(f"{name}: case {case} is not defined in {BEHAVIOUR}")
        own = own_sections(text) if name == BEHAVIOUR else cited_sections(text)
        for section in sorted(own - sections, key=_section_key):
            problems.append(f"{name}: §{section} is not a section of {BEHAVIOUR}")
        for title in sorted(cited_headings(text) - titles):
            problems.append(f'{name}: "{title}" is not a heading of {ARCHITECTURE}')
        for line in foreign_citations(text):
            problems.append(f"{name}: cites notes outside the repository: {line[:120]}")
    return problems


def _section_key(section: str) -> tuple[int, ...]:
    return tuple(int(p) for p in section.split("."))


# ------------------------------------------------------------------------------------ the scanner itself

FIXTURE_BEHAVIOUR = """# Behaviour
## 3. Common processing
### 3.1 Validation
See §3.1 and RFC 3261 §10.3, RFC 3261 §16.6/16.7.
## 15. Test cases
**T08 Path stripped.** Given ...
**T59 Concurrent REGISTERs.** Given ...
"""
FIXTURE_ARCHITECTURE = "# Architecture\n## Shared state in etcd\n"


def test_case_ids_are_found_in_names_docstrings_and_comments() -> None:
    text = (
        "def test_t08_path_is_stripped() -> None:\n"
        "def test_t02_t03_t04_validation() -> None:\n"
        '    """[REC] T59: one relay."""  # (T60)\n'
        "T57 and T1, T2, T4 timers; started at T0; sha T123; xT10y; MT10; test_t7_x\n"
    )
    assert cited_cases(text) == {"T08", "T02", "T03", "T04", "T59", "T60", "T57"}


def test_behaviour_sections_are_found_with_their_lists() -> None:
    text = (
        "(behaviour §3.1 item 5), behaviour §5.2/§6.2, behaviour §5.4, §6.4; behaviour.md §9. "
        "behaviour §3.3 and §6.1; RFC 3261 §17 and X-free §4 alone are not ours"
    )
    assert cited_sections(text) == {"3.1", "5.2", "6.2", "5.4", "6.4", "9", "3.3", "6.1"}


def test_foreign_notes_are_found_but_code_names_are_not() -> None:
    spec, _, tooling = _NOTE_NAMES
    cited = [
        f"see {_OUTSIDE}/{spec}.md",
        f"({tooling}.md: uvloop)",
        f"# {spec} §2.2 hop",
        f"Where {spec} gives [OBS]",
    ]
    code = [f"{spec} = parse_spec({{}})", f"compute_status({spec}, REF)", "a MidRegistrar spec, the design"]
    assert foreign_citations("\n".join(cited + code) + "\n") == cited


def test_unresolved_lists_each_missing_definition() -> None:
    texts = {
        "docs/behaviour.md": FIXTURE_BEHAVIOUR + "As in §7.\n",
        "registrar/a.py": '"""T08, T59 (behaviour §3.1)."""\ndef test_t65_x(): ...\n',
        "registrar/b.py": "# behaviour §3.2, §15: T99\n",
        "README.md": 'see `docs/architecture.md` ("Shared state in etcd") and architecture "Networking"\n',
        "docs/x.md": f"see {_NOTE_NAMES[1]}.md §5\n",
    }
    assert unresolved(texts, FIXTURE_BEHAVIOUR, FIXTURE_ARCHITECTURE) == [
        'README.md: "Networking" is not a heading of docs/architecture.md',
        "docs/behaviour.md: §7 is not a section of docs/behaviour.md",
        f"docs/x.md: cites notes outside the repository: see {_NOTE_NAMES[1]}.md §5",
        "registrar/a.py: case T65 is not defined in docs/behaviour.md",
        "registrar/b.py: case T99 is not defined in docs/behaviour.md",
        "registrar/b.py: §3.2 is not a section of docs/behaviour.md",
    ]


def test_a_new_file_with_a_bad_citation_is_caught(tmp_path: Path) -> None:
    """The repository scan, not just the fixture: a file git sees in a copy of the checkout is read."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "behaviour.md").write_text(FIXTURE_BEHAVIOUR)
    (tmp_path / "note.py").write_text("# T08 and T42, behaviour §3.1\n")
    (tmp_path / "blob.bin").write_bytes(b"T43\0")
    listed = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"], cwd=tmp_path, capture_output=True, check=True
    ).stdout.decode()
    assert "note.py" in listed
    texts = {
        name: (tmp_path / name).read_text()
        for name in listed.split()
        if b"\0" not in (tmp_path / name).read_bytes()
    }
    assert unresolved(texts, FIXTURE_BEHAVIOUR, FIXTURE_ARCHITECTURE) == [
        "note.py: case T42 is not defined in docs/behaviour.md"
    ]


# ------------------------------------------------------------------------------------ the repository


def _read(name: str) -> str:
    return (REPO / name).read_text()


def test_behaviour_defines_each_case_t01_to_t64_once() -> None:
    assert defined_cases(_read(BEHAVIOUR)) == [f"T{n:02d}" for n in range(1, 65)]


def test_behaviour_defines_the_sections_the_code_follows() -> None:
    sections = defined_sections(_read(BEHAVIOUR))
    expected = {"1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15"}
    expected |= {"2.1", "2.2", "2.3", "2.4", "3.1", "3.2", "3.3", "3.4", "3.5", "5.4", "6.1", "6.5"}
    expected |= {"8.1", "8.2", "8.3", "8.4", "8.5", "8.6", "8.7", "9.1", "9.2", "9.3", "9.4", "10.3"}
    assert expected <= sections


# Cases no test can exercise, as behaviour §14 says: why each one is not a test.
UNTESTED = {
    "T01": "holds by construction: only REGISTER reaches REGISTER processing",
    "T26": "there is no per-call outgoing lifetime to set",
}


def test_every_case_is_exercised_by_a_test() -> None:
    tested: set[str] = set()
    for name, text in tracked_texts().items():
        if name.startswith("tests/") and name != SELF:
            tested |= cited_cases(text)
    defined = set(defined_cases(_read(BEHAVIOUR)))
    assert sorted(defined - tested - set(UNTESTED)) == []
    assert sorted(tested & set(UNTESTED)) == [], (
        "a case listed as untested is tested now: drop it from UNTESTED"
    )


def test_every_citation_in_the_repository_resolves() -> None:
    texts = tracked_texts()
    del texts[SELF]
    problems = unresolved(texts, _read(BEHAVIOUR), _read(ARCHITECTURE))
    assert not problems, "\n".join(problems)
