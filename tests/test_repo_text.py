"""The repository's text speaks of the software, not of how it was made, and never links outside the checkout.

Every tracked text file is read: no figure keyed by a working session, no "issue N", no helper or machine
nicknames; every relative link in a Markdown or HTML file stays inside the checkout and names a file that exists.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from parts, so this file does not match its own patterns.
_S = "ses" + "sion"
PROCESS_TALK = [
    re.compile(
        r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|this|earlier|last|next|GPU) " + _S + r"\b", re.I
    ),
    re.compile(r"\bis" + r"sue \d+\b", re.I),
    re.compile(r"review " + "helper", re.I),
    re.compile(r"the is" + r"sue's target", re.I),
    re.compile(r"H200 " + "box", re.I),
]

# Hits in files whose wording is being changed elsewhere: each must still be there (remove it once it is gone).
KNOWN: dict[str, str] = {}

MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HTML_LINK = re.compile(r"""\b(?:href|src)=["']([^"']+)["']""")
CODE_PATH = re.compile(r"`(\.\./[^`\s]+)`")  # a path named in a code span, such as `../elsewhere/FILE.md`


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def text_of(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:  # listed by git but absent (a deleted, uncommitted file)
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_text_speaks_of_how_the_work_was_done():
    problems, seen_known = [], set()
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        rel = path.relative_to(ROOT).as_posix()
        for number, line in enumerate(text.splitlines(), 1):
            for pattern in PROCESS_TALK:
                for match in pattern.finditer(line):
                    if KNOWN.get(rel, "").lower() == match.group(0).lower():
                        seen_known.add(rel)
                        continue
                    problems.append(f"{rel}:{number}: {match.group(0)!r} in {line.strip()[:120]!r}")
    assert not problems, "text about how the work was done:\n" + "\n".join(problems)
    assert seen_known == set(KNOWN), f"no longer found, remove from KNOWN: {sorted(set(KNOWN) - seen_known)}"


def relative_links(path: Path, text: str) -> list[str]:
    found = MARKDOWN_LINK.findall(text) + CODE_PATH.findall(text) if path.suffix == ".md" else HTML_LINK.findall(text)
    links = []
    for target in found:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "//")):
            continue  # a URL with a scheme, an anchor on the same page, a protocol-relative URL
        links.append(target)
    return links


def test_relative_links_stay_inside_the_checkout_and_exist():
    problems = []
    for path in tracked_files():
        if path.suffix not in (".md", ".html"):
            continue
        text = text_of(path)
        if text is None:
            continue
        rel = path.relative_to(ROOT).as_posix()
        for target in relative_links(path, text):
            file_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
            if not file_part:
                continue
            if path.suffix == ".html" and file_part.startswith("/"):
                continue  # a URL path on the server (the page's /static/...), not a file
            resolved = (path.parent / file_part).resolve()
            if not resolved.is_relative_to(ROOT):
                problems.append(f"{rel}: {target} leaves the checkout")
            elif not resolved.exists():
                problems.append(f"{rel}: {target} does not exist")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "line, hits",
    [
        ("figures of the " + "seventh " + _S + " (b29db23)", 1),
        ("see is" + "sue 12 for the details", 1),
        ("two review " + "helpers read it", 1),
        ("an HTTP " + _S + ", an ONNX Runtime " + _S + ", " + _S + " affinity", 0),
    ],
)
def test_the_patterns_catch_what_they_mean_to_and_no_more(line, hits):
    assert sum(len(p.findall(line)) for p in PROCESS_TALK) == hits
