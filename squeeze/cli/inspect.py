"""``squeeze inspect``: a model's architecture, size and the memory its weights need."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from squeeze.cli.app import ModelArg, TrustOption, app, call, out
from squeeze.models import inspect_model, resolve_model


@app.command()
def inspect(
    model: ModelArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    trust_remote_code: TrustOption = False,
) -> None:
    """Architecture, parameter count and the memory the weights need at fp32/bf16/int8/int4."""
    info = call(lambda: inspect_model(resolve_model(model, trust_remote_code=trust_remote_code)))
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
        return
    table = Table(title=f"{info.get('name', model)}", show_header=False)
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in info.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                table.add_row(f"{key} {sub}", _human(v, sub))
        else:
            table.add_row(key, _human(value, key))
    out.print(table)


def _human(value, key: str) -> str:
    if isinstance(value, int) and ("bytes" in key or key in ("fp32", "bf16", "int8", "int4")):
        return f"{value / 1024**2:,.1f} MiB ({value:,} bytes)"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
