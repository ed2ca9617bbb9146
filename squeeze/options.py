"""Plug-in options and registries: the one place a method's or format's names, defaults, bounds
and help text are written, and the name → plug-in tables that the CLI, recipes and Python read.

A method declares its options as a :class:`MethodOptions` model whose fields are made with
:func:`option`. The field name is the Python keyword and the recipe key (``damp_percent``), the
CLI flag is derived from it (``--damp-percent``, or the ``flag`` given, e.g.
``--act-order/--no-act-order``), the description is the ``--help`` text and the default is the
default everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from squeeze.errors import OptionError


class MethodOptions(BaseModel):
    """A method's own options (none by default). Frozen; unknown names are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def settings(self) -> dict[str, Any]:
        """The options as the report and the checkpoint's metadata record them (``in_report`` fields)."""
        return {name: getattr(self, name) for name, field in type(self).model_fields.items() if field_meta(field).get("in_report", True)}


def option(default: Any, help: str, *, flag: str | None = None, in_report: bool = True, **bounds: Any) -> Any:
    """A field of a MethodOptions model: its ``default``, its ``--help`` text, an explicit CLI
    ``flag`` declaration where the derived one does not fit (``--act-order/--no-act-order``),
    whether the report records it, and pydantic bounds (``ge``, ``gt``, ``le``, ``lt``)."""
    return Field(default, description=help, json_schema_extra={"flag": flag, "in_report": in_report}, **bounds)


def field_meta(field: Any) -> dict[str, Any]:
    """The ``option`` extras of a pydantic field (empty for plain fields)."""
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


T = TypeVar("T", bound=BaseModel)


def validate_options(model: type[T], values: Mapping[str, Any]) -> T:
    """``model(**values)``; a pydantic error becomes an OptionError naming the first bad option."""
    try:
        return model(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "extra_forbidden":
            raise OptionError(f"unknown option {{0}} for {model.__name__}", name) from None
        got = values.get(name, error.get("input"))
        raise OptionError(f"{{0}} {error['msg'].lower()}, got {got!r}", name) from None


P = TypeVar("P")


class Registry(Generic[P]):
    """Plug-ins by name (methods, formats), in the order registered.

    ``what`` names the kind in errors ("quantization method") and ``option`` the option that
    chooses one ("method", "format")."""

    def __init__(self, what: str, option: str) -> None:
        self.what = what
        self.option = option
        self._items: dict[str, P] = {}

    def add(self, name: str, item: P) -> P:
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> P:
        """The plug-in called ``name``; an OptionError listing the choices otherwise."""
        if name not in self._items:
            raise OptionError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self._items)}")
        return self._items[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[P]:
        return iter(self._items.values())
