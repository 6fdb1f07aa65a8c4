"""Settings: config dataclass fields that carry their own command-line help.

A default is written once, on the field, and everything else reads it from there: the CLI builds
each flag from the field (name, type, choices, help) and appends "(default: ...)" from the field's
own default, the README's flag tables are generated from that parser, and a command builds its
config from only what the user typed, so the dataclass fills in the rest.

    max_tokens: int = setting(200, "new tokens per story at most")
    seed: int | None = setting(None, "random seed for reproducible samples", default_text="random")

No torch here, and none in the config modules that use it: `storyseek --help` stays instant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import StoryseekError

def setting(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
            flag: str | None = None, choices: tuple | None = None, metavar: str | None = None,
            default_text: str | None = None, env: str | None = None, group: str | None = None) -> Any:
    """A dataclass field with its flag's help. `flag`: the flag's name when it is not the field's
    (underscores become dashes); `default_text`: how to show a default that is not a plain value
    (None, or computed at run time); `env`: an environment variable that overrides the default,
    read only by the command that uses it; `group`: the --help section."""
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "default_text": default_text,
            "env": env, "group": group}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f.name.replace("_", "-")


def default_text(f: dataclasses.Field) -> str | None:
    """How `--help` shows this field's default ("" when there is nothing worth showing)."""
    if f.metadata.get("default_text") is not None:
        text = f.metadata["default_text"]
    elif f.default is dataclasses.MISSING or f.default is None or f.default is False:
        text = ""
    elif f.default is True:
        text = "on"
    else:
        text = str(f.default)
    if f.metadata.get("env"):
        text = f"{text}, or ${f.metadata['env']}" if text else f"${f.metadata['env']}"
    return text


def with_env(cls: type, typed: dict, environ: dict) -> dict:
    """`typed` plus, for each field of `cls` with an `env` variable that the user did not override by a
    flag, the variable's value converted to the field's type. A bad value is a StoryseekError naming the
    variable, raised here, when the command runs: never while other commands' parsers are built."""
    out = dict(typed)
    for f in dataclasses.fields(cls):
        name = f.metadata.get("env")
        if not name or f.name in typed or name not in environ:
            continue
        kind = {"int": int, "float": float, "str": str}[str(f.type).split(" |")[0]]
        try:
            out[f.name] = kind(environ[name])
        except ValueError:
            raise StoryseekError(f"${name} must be a{'n integer' if kind is int else ' number'}, "
                             f"got {environ[name]!r}") from None
    return out
