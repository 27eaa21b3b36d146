"""The options of the ``diffcircuit`` commands that have a config dataclass, made from that dataclass.

Each such command takes one flag per field, made from the field's type, default and line of help (the ``*_HELP``
mapping beside the dataclass), so that the command line, the config and its docs cannot drift; ``given`` turns the
flags back into field -> value for ``config_from_mapping``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from typing import Annotated

import typer

__all__ = ["FLAGS", "config_command", "config_parameters", "given"]

# FLAGS: the fields whose flag is not --field-name (a tuple: the flag, then other spellings it also accepts); the
# library names fields, only the command line names flags (an error's fields are shown as the first spelling)
FLAGS: dict[str, str | tuple[str, ...]] = {
    "names": "--target",
    "levels": "--level",
    "layers": "--layer",
    "metric": "--circuit-metric",
    "windows": "--window",
    "ray_address": "--address",
    "timestep": ("--timesteps", "--timestep"),
    "natural_share": ("--natural-share", "--faces-share"),
}


def _default_text(value) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return None if f.default_factory is dataclasses.MISSING else f.default_factory()


def _field_option(
    name: str,
    hint,
    default,
    help_text: str,
    *,
    flag: str | tuple[str, ...],
    repeatable: bool = False,
    required: bool = False,
) -> inspect.Parameter:
    """A keyword parameter whose typer option sets config field ``name``: None when not given on the command line,
    so that the config's default (or a config file's value) holds. Tuples are comma-separated text, or with
    ``repeatable`` one flag per item."""
    inner = (
        [h for h in typing.get_args(hint) if h is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else [hint]
    )
    kind = inner[0] if inner[0] in (bool, int, float, str) else str
    names = (flag,) if isinstance(flag, str) else flag
    decls = (f"{names[0]}/--no-{names[0][2:]}", *names[1:]) if kind is bool else names
    if required:
        option = typer.Option(*decls, help=help_text)
        annotation: object = Annotated[list[str] if repeatable else kind, option]
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation)
    option = typer.Option(*decls, help=f"{help_text} [{_default_text(default)}]")
    annotation = Annotated[(list[str] if repeatable else kind) | None, option]
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
    )


def config_parameters(
    cls: type,
    help: Mapping[str, str],
    *,
    flags: Mapping[str, str | tuple[str, ...]] = FLAGS,
    skip: Collection[str] = (),
    repeatable: Collection[str] = (),
    required: Collection[str] = (),
    extra_before: Sequence[inspect.Parameter] = (),
    extra_after: Sequence[inspect.Parameter] = (),
) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of the config dataclass ``cls`` (but ``skip``): its flag
    (``flags[field]``, else ``--field-name``), its type from the field's hint, and its help: the field's line of
    ``help`` and its default. ``extra_before`` and ``extra_after``: the command's own options around them."""
    hints = typing.get_type_hints(cls)
    return [
        *extra_before,
        *(
            _field_option(
                f.name,
                hints[f.name],
                _field_default(f),
                help[f.name],
                flag=flags.get(f.name, "--" + f.name.replace("_", "-")),
                repeatable=f.name in repeatable,
                required=f.name in required,
            )
            for f in dataclasses.fields(cls)
            if f.name not in skip
        ),
        *extra_after,
    ]


def config_command(
    app: typer.Typer,
    name: str,
    cls: type,
    help: Mapping[str, str],
    *,
    after=("quiet", "threads"),
    **options,
):
    """Register the decorated function as command ``name`` of ``app``: its own keyword parameters (``--out``, ...;
    those named in ``after`` last) and one option per field of ``cls`` (``config_parameters``), which arrive in its
    ``**flags``, None for each one not given."""

    def register(fn):
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [
            p.replace(annotation=hints[p.name])
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        params = config_parameters(
            cls,
            help,
            extra_before=[p for p in own if p.name not in after],
            extra_after=[p for p in own if p.name in after],
            **options,
        )
        fn.__signature__ = inspect.Signature(params)
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return app.command(name)(fn)

    return register


def given(flags: Mapping[str, object]) -> dict[str, object]:
    """The flags given on the command line (not None), as field -> value for ``config_from_mapping``."""
    return {k: v for k, v in flags.items() if v is not None}
