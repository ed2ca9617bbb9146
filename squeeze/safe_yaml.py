"""YAML read safely: PyYAML's safe loader, with limits on nesting and on what aliases expand to, and
the line of every key path for error messages.

A safe loader runs no code, but a few hundred bytes of aliases of aliases (``&a [*b, *b, ...]``)
stand for billions of values, and a value nested a thousand brackets deep overflows the recursion
of PyYAML's composer. Both are refused here, with the line they are on, before anything is built.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any

import yaml

MAX_DEPTH = 64  # levels of nesting a file may have, aliases expanded
MAX_VALUES = 100_000  # values (keys, items, scalars) a file may expand to through its aliases

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def shown(value: Any) -> str:
    """``repr(value)`` for a one-line message: long strings and big or deep lists cut short."""
    return _short.repr(value)


class TooLarge(yaml.MarkedYAMLError):
    """Nesting or aliases beyond MAX_DEPTH or MAX_VALUES: valid YAML, but more than a file of
    settings ever needs."""


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``2e6`` as a number (YAML 1.1 wants ``2.0e+6``), stops nesting
    past MAX_DEPTH while composing (the composer recurses once per level), and turns a scalar its
    tag cannot make (month 13, a 5,000-digit integer, ``!!int abc``) into a YAML error."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise TooLarge(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except Exception as exc:  # the scalar constructors raise ValueError, KeyError, AttributeError, ...
            if isinstance(exc, yaml.YAMLError) or not isinstance(node, yaml.ScalarNode):
                raise
            what = node.tag.rpartition(":")[2]
            raise yaml.constructor.ConstructorError(problem=f"{shown(node.value)} is not a valid {what}", problem_mark=node.start_mark) from None


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"),
)


def _measure(node: yaml.Node, path: tuple | None, lines: dict[tuple, int], measured: dict, depth: int = 1) -> tuple[int, int]:
    """(values, levels) of ``node`` as a safe loader builds it, aliases expanded, recording the line
    of every ``path`` on the way (None: inside a mapping key). A node reached again through an alias
    is measured once, not walked again, so aliases of aliases cost no more than they take to write;
    TooLarge past MAX_DEPTH levels or MAX_VALUES values."""
    if path is not None:
        lines[path] = node.start_mark.line + 1
    if depth + (measured[node][1] - 1 if node in measured else 0) > MAX_DEPTH:  # an alias inside itself ends here too
        raise TooLarge(problem=f"nested more than {MAX_DEPTH} levels deep (aliases expanded)", problem_mark=node.start_mark)
    if node not in measured:
        if isinstance(node, yaml.MappingNode):
            pairs = [(key.value if isinstance(key, yaml.ScalarNode) else None, key, value) for key, value in node.value]
        else:
            pairs = [(index, None, item) for index, item in enumerate(node.value if isinstance(node, yaml.SequenceNode) else ())]
        values, levels = 1, 0
        for step, key, value in pairs:
            child = None if path is None or step is None else path + (step,)
            parts = [_measure(value, child, lines, measured, depth + 1)]
            if key is not None:
                parts.append(_measure(key, None, lines, measured, depth + 1))
                if child is not None:
                    lines[child] = key.start_mark.line + 1  # point at the key, not its value
            values, levels = values + sum(v for v, _ in parts), max([levels] + [n for _, n in parts])
        if values > MAX_VALUES:
            raise TooLarge(problem=f"holds more than {MAX_VALUES:,} values with its aliases expanded", problem_mark=node.start_mark)
        measured[node] = values, levels + 1
    return measured[node]


def read_yaml(text: str) -> tuple[Any, dict[tuple, int]]:
    """The plain data of one YAML document and the line (from 1) of every key path in it
    (``("stages", 0, "prune")``; mapping keys as written). yaml.YAMLError for anything wrong,
    TooLarge before anything too deep or too large is built."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        lines: dict[tuple, int] = {}
        if node is None:
            return None, lines
        _measure(node, (), lines, {})
        return loader.construct_document(node), lines
    finally:
        loader.dispose()


def describe(exc: yaml.YAMLError, text: str, source: object) -> str:
    """``SOURCE:LINE: what is wrong`` in one line, for an error that ``read_yaml(text)`` raised."""
    if isinstance(exc, yaml.reader.ReaderError):  # no mark: the reader checks the whole text first
        line = text.count("\n", 0, exc.position) + 1
        return f"{source}:{line}: not valid YAML: character #x{exc.character:04x} is not allowed"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    words = ", ".join(part for part in (getattr(exc, "context", None), getattr(exc, "problem", None)) if part) or str(exc)
    line = f"{mark.line + 1}:" if mark else ""
    kind = "" if isinstance(exc, TooLarge) else "not valid YAML: "
    return f"{source}:{line} {kind}{' '.join(words.split())}"
