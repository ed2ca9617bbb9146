"""Plug-in options and registries: the one place a method's or format's names, defaults, bounds
and help text are written, and the name → plug-in tables that the CLI, recipes and Python read.

A method declares its options as a :class:`MethodOptions` model whose fields are made with
:func:`option`. The field name is the Python keyword and the recipe key (``damp_percent``), the
CLI flag is derived from it (``--damp-percent``, or the ``flag`` given, e.g.
``--act-order/--no-act-order``), the description is the ``--help`` text and the default is the
default everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from squeeze.errors import OptionError, literal


class MethodOptions(BaseModel):
    """A method's own options (none by default). Frozen; unknown names are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def settings(self) -> dict[str, Any]:
        """The options as the report and the checkpoint's metadata record them (``in_report`` fields)."""
        return {name: getattr(self, name) for name, field in type(self).model_fields.items() if field_meta(field).get("in_report", True)}


def option(
    default: Any, help: str, *, flag: str | None = None, in_report: bool = True, error: str | None = None, **bounds: Any
) -> Any:
    """A field of a MethodOptions model: its ``default``, its ``--help`` text, an explicit CLI
    ``flag`` declaration where the derived one does not fit (``--act-order/--no-act-order``),
    whether the report records it, pydantic bounds (``ge``, ``gt``, ``le``, ``lt``) and the words
    for a value out of them (``error="damp percent must be in (0, 1]"``; the value and the option,
    in the caller's spelling, are appended)."""
    extra = {"flag": flag, "in_report": in_report} | ({"error": error} if error else {})
    return Field(default, description=help, json_schema_extra=extra, **bounds)


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
        got = literal(repr(values.get(name, error.get("input"))))
        words = field_meta(model.model_fields[name]).get("error") if name in model.model_fields else None
        if words:
            raise OptionError(f"{literal(words)}, got {got} ({{0}})", name) from None
        raise OptionError(f"{{0}} {literal(error['msg'].lower())}, got {got}", name) from None


def as_options(model: type[T], given: BaseModel | Mapping[str, Any] | None) -> T:
    """``given`` as a ``model`` instance: itself if it is one, else validated as in
    :func:`validate_options` (a mapping of options, another options model, or None for the defaults)."""
    if isinstance(given, model):
        return given
    return validate_options(model, given.model_dump() if isinstance(given, BaseModel) else dict(given or {}))


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

    def register(self, cls: type) -> type:
        """Class decorator: register an instance of ``cls`` under ``cls.name``."""
        self.add(cls.name, cls())
        return cls

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


class MethodRegistry(Registry[P]):
    """A Registry of methods, each with an ``Options`` model (a MethodOptions subclass).

    A pass's recipe stage and command hold the options of all its methods side by side, so an
    option that two methods share must be declared identically (type, default, bounds, help);
    a method declaring it differently is refused when it is registered."""

    def add(self, name: str, item: P) -> P:
        shared = self.options()
        for option_name, field in item.Options.model_fields.items():  # type: ignore[attr-defined]
            if option_name in shared and _declaration(shared[option_name]) != _declaration(field):
                raise ValueError(
                    f"{self.what} {name!r} declares option {option_name!r} unlike the {self.what}s registered before it"
                )
        return super().add(name, item)

    def options(self) -> dict[str, FieldInfo]:
        """Every option of the registered methods, once each, in the order they were registered."""
        fields: dict[str, FieldInfo] = {}
        for item in self:
            for option_name, field in item.Options.model_fields.items():  # type: ignore[attr-defined]
                fields.setdefault(option_name, field)
        return fields

    def fields(self, reserved: Iterable[str] = ()) -> dict[str, Any]:
        """Every option as a field for ``pydantic.create_model`` (a pass's recipe stage): the same
        name, type, default, help and flag, but not the bounds, which the method checks when a
        config is built, so that the CLI and recipes each word the error. ``reserved``: the names
        of the stage's own fields, which no method option may take."""
        fields = {}
        for option_name, field in self.options().items():
            if option_name in reserved:
                raise ValueError(f"the {self.what}s' option {option_name!r} has the name of a common option")
            extra = field.json_schema_extra
            fields[option_name] = (field.annotation, Field(field.default, description=field.description, json_schema_extra=extra))
        return fields


def _declaration(field: FieldInfo) -> tuple:
    return field.annotation, field.default, field.description, field.json_schema_extra, field.metadata
