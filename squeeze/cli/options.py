"""Command-line options made from option models, so that a name, default and help text are
written once: in the pydantic model (a recipe stage, a method's MethodOptions) that the recipe
and the Python API read too.

A field ``damp_percent: float = option(0.01, "help...")`` becomes ``--damp-percent FLOAT``
with default 0.01 and that help; ``field_meta(field)["flag"]`` overrides the flag
(``--act-order/--no-act-order``); a bool field without one is an on-switch (``--act-asym``); a
tuple field is a repeatable option, a dict field a repeatable ``KEY=VALUE`` one.
``with_options`` splices the generated options into a command's own signature, where typer
reads them, and hands their values to the command as keyword arguments::

    @app.command()
    @with_options(model_options(DistillStage, exclude=("teacher", "student")))
    def distill(teacher: ..., student: ..., out_dir: ... = None, **stage: Any) -> None:
        ...  # stage holds temperature, alpha, steps, ... as typed on the command line
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal, Optional, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from squeeze.errors import cli_spelling
from squeeze.options import field_meta

F = TypeVar("F", bound=Callable[..., Any])


def cli_type(annotation: Any) -> Any:
    """The type typer parses for a field's annotation: ``X | None`` → ``Optional[X]``, a
    Literal of words → ``str``, a tuple or list → ``list`` (a repeatable option)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            return Optional[cli_type(inner[0])]
    if origin is Literal:
        return type(args[0])
    if origin in (tuple, list, set, frozenset):
        return list[args[0]]
    if origin is dict:  # KEY=VALUE, repeatable: the command parses the entries
        return list[str]
    return annotation


def field_option(name: str, field: FieldInfo, **override: Any) -> inspect.Parameter:
    """The typer option of one model field, as a keyword parameter typer reads.

    ``override`` replaces what the field says: ``flag`` (the declaration, e.g. ``--target``),
    ``help``, ``default``, ``annotation`` (e.g. ``Optional[Path]`` for a folder kept as text)."""
    flag = override.get("flag") or field_meta(field).get("flag") or cli_spelling(name)
    default = override["default"] if "default" in override else field.default
    if default is PydanticUndefined:
        raise ValueError(f"option {name!r} has no default; a command-line option needs one")
    if isinstance(default, (tuple, frozenset, set)):
        default = list(default)
    if isinstance(default, dict):
        default = [f"{key}={value}" for key, value in default.items()]
    annotation = override.get("annotation") or cli_type(field.annotation)
    info = typer.Option(flag, help=override.get("help", field.description))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, info])


def model_options(
    model: type[BaseModel] | Mapping[str, FieldInfo],
    *,
    exclude: Iterable[str] = (),
    only: Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[inspect.Parameter]:
    """One option per field of ``model`` (a pydantic model or a name → field mapping), in field
    order: all of them, or ``only`` those, less ``exclude``; ``overrides`` maps a field name to
    ``field_option`` overrides."""
    fields = model.model_fields if isinstance(model, type) else model
    names = list(only) if only is not None else list(fields)
    unknown = [name for name in [*names, *exclude, *(overrides or {})] if name not in fields]
    if unknown:
        raise ValueError(f"no field {', '.join(map(repr, unknown))} to make an option of")
    skip = set(exclude)
    return [field_option(name, fields[name], **(overrides or {}).get(name, {})) for name in names if name not in skip]


def with_options(*groups: Iterable[inspect.Parameter], **after: Iterable[inspect.Parameter]) -> Callable[[F], F]:
    """Give the decorated command generated options: its signature (``__signature__``,
    ``__annotations__``, which typer reads) becomes its own parameters with ``groups`` where its
    ``**values`` is, and each group named by a keyword right after the own parameter of that name
    (``@with_options(data=CALIBRATION)`` puts them after ``data``). Typer calls the command with
    every option by keyword, so the generated ones arrive in ``**values``. Apply it under
    ``@app.command()``."""
    placed = {name: list(group) for name, group in after.items()}
    generated = [parameter for group in [*groups, *placed.values()] for parameter in group]

    def decorate(command: F) -> F:
        own = inspect.signature(command, eval_str=True)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.parameters.values()):
            raise TypeError(f"{command.__name__} takes no **values for its generated options")
        missing = set(placed) - set(own.parameters)
        if missing:
            raise TypeError(f"{command.__name__} has no parameter {', '.join(sorted(missing))} to put generated options after")
        names = [p.name for p in generated]
        taken = set(own.parameters) & set(names) | {name for name in names if names.count(name) > 1}
        if taken:
            raise TypeError(f"{command.__name__} gets {', '.join(sorted(taken))} twice")
        parameters: list[inspect.Parameter] = []
        for parameter in own.parameters.values():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                parameters += [p for group in groups for p in group]
                continue
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            parameters += placed.get(parameter.name, [])
        command.__signature__ = own.replace(parameters=parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": own.return_annotation}
        return command

    return decorate
