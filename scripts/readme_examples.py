"""The README's curl examples: find them, run them against a server, and (with --write) refresh their outputs.

An example is a ```bash block whose lines start with `curl`; when a ```json block follows it directly,
that block is the example's output. `<!-- readme: skip -->` on the line before a bash block exempts it
(examples that need Docker, a cluster or the network). Outputs are written abbreviated, so the README
stays readable: lists of more than four items keep their first three, floats keep four decimals.

    python scripts/readme_examples.py --url http://127.0.0.1:8000 --write   # refresh README.md
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
DEFAULT_URL = "http://localhost:8000"
SKIP = "<!-- readme: skip -->"


@dataclass
class Example:
    command: str  # the bash block's text
    output: str | None  # the json block after it, if any
    output_span: tuple[int, int] | None  # where that json block's body sits in the README


def find_examples(text: str) -> list[Example]:
    blocks = list(FENCE.finditer(text))
    examples = []
    for i, block in enumerate(blocks):
        lang, body = block.group(1), block.group(2)
        if lang != "bash" or not any(line.startswith("curl ") for line in body.splitlines()):
            continue
        before = text[: block.start()].rstrip().splitlines()
        if before and before[-1].strip() == SKIP:
            continue
        output, span = None, None
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        if nxt is not None and nxt.group(1) == "json" and text[block.end() : nxt.start()].strip() == "":
            output, span = nxt.group(2), (nxt.start(2), nxt.end(2))
        examples.append(Example(body, output, span))
    return examples


def run(example: Example, url: str, cwd: Path | None = None, timeout: float = 60) -> str:
    """Run the example's commands with bash against `url`, in `cwd` (default: a scratch folder holding
    a copy of examples/ and README.md, so files the examples write land there); returns stdout."""
    if cwd is None:
        cwd = Path(tempfile.mkdtemp(prefix="readme-"))
        shutil.copytree(ROOT / "examples", cwd / "examples")
        shutil.copy(README, cwd / "README.md")
    command = example.command.replace(DEFAULT_URL, url).replace("localhost:8000", url.removeprefix("http://"))
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"example failed ({done.returncode}):\n{example.command}\n{done.stderr}")
    return done.stdout


def abbreviate(value: object, keep: int = 3) -> object:
    """Lists of more than four items keep their first `keep`; floats keep four decimals."""
    if isinstance(value, dict):
        return {k: abbreviate(v, keep) for k, v in value.items()}
    if isinstance(value, list):
        return [abbreviate(v, keep) for v in (value[:keep] if len(value) > 4 else value)]
    if isinstance(value, float):
        return round(value, 4)
    return value


def render(value: object, indent: int = 0, width: int = 100) -> str:
    """JSON laid out like the README shows it: whatever fits on a line stays on one line."""
    flat = json.dumps(value)
    if len(flat) + indent <= width or not isinstance(value, dict | list) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {render(v, indent + 2, width)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + render(v, indent + 2, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def refresh(url: str) -> None:
    text = README.read_text()
    edits = []
    for example in find_examples(text):
        if example.output_span is None:
            run(example, url)
            continue
        output = json.loads(run(example, url))
        edits.append((example.output_span, render(abbreviate(output)) + "\n"))
    for (start, end), new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--write", action="store_true", help="rewrite the README's output blocks")
    args = parser.parse_args()
    if args.write:
        refresh(args.url)
    else:
        for example in find_examples(README.read_text()):
            print(example.command.strip(), "\n->", run(example, args.url)[:200], "\n")


if __name__ == "__main__":
    main()
