"""The command line: `vit-serve [OPTIONS]` and `python -m app [OPTIONS]` parse the options into `Settings` and
serve them (`app.process.run`).

Every field of `Settings` is a flag, `--` and its name with dashes (`max_queue`: `--max-queue`), its help the
field's description. Flags become keyword arguments of `Settings`, so a flag wins over its `VIT_*` variable.
The repeatable `--model` / `--arch` / `--image-size` are paired here: `--arch` and `--image-size` belong to the
`--model` they follow; an `--image-size` before any `--model` applies to all. Given on the command line, the
model list replaces the variable's list; it never merges with it.

Exit status: 2 for a bad option; otherwise that of `app.process.run`.
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError

from app.process import run
from app.settings import Settings

REPEATABLE = {  # the fields whose flags repeat, with their argparse options
    "model": {"metavar": "[NAME=]SPEC"},
    "arch": {},
    "image_size": {"metavar": "N", "type": int},
}


class _Ordered(argparse.Action):
    """Records (flag, value) in command-line order, so --arch/--image-size pair with their --model."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        namespace.ordered.append((self.dest, values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vit-serve",
        description="Serve Vision Transformer checkpoints over HTTP. Every option is also a VIT_<NAME> variable.",
    )
    p.set_defaults(ordered=[])
    for field, info in Settings.model_fields.items():
        flag = "--" + field.replace("_", "-")
        text = (info.description or "").replace("%", "%%")  # argparse formats help with %
        if field in REPEATABLE:
            p.add_argument(flag, dest=field, action=_Ordered, help=text, **REPEATABLE[field])
        else:
            p.add_argument(flag, dest=field, default=None, help=text)
    return p


def pair_models(ordered: list[tuple[str, Any]], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The ordered --model/--arch/--image-size flags -> Settings kwargs (aligned lists)."""
    models: list[str] = []
    arches: list[str | None] = []
    sizes: list[int | None] = []
    global_size: int | None = None
    for dest, value in ordered:
        if dest == "model":
            models.append(value)
            arches.append(None)
            sizes.append(global_size)
        elif dest == "arch":
            if not models:
                parser.error("--arch must follow the --model it describes")
            arches[-1] = value
        elif not models:
            global_size = value
        else:
            sizes[-1] = value
    if models:
        return {"model": models, "arch": arches, "image_size": sizes}
    return {"image_size": [global_size]} if global_size is not None else {}


def parse_settings(argv: list[str] | None = None) -> Settings:
    """The command line (and the environment) -> Settings; a bad option ends the process with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    kwargs = pair_models(args.ordered, parser)
    for field in Settings.model_fields.keys() - REPEATABLE.keys():
        if getattr(args, field) is not None:
            kwargs[field] = getattr(args, field)
    try:
        return Settings(**kwargs)
    except (ValidationError, ValueError) as e:
        parser.error(one_line(e))
        raise  # unreachable: parser.error exits


def one_line(error: Exception) -> str:
    if isinstance(error, ValidationError):
        parts = []
        for err in error.errors():
            where = ".".join(str(x) for x in err.get("loc", ()))
            msg = err.get("msg", "").removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        return "; ".join(parts)
    return str(error)


def main(argv: list[str] | None = None) -> None:
    run(parse_settings(argv))


if __name__ == "__main__":
    main()
