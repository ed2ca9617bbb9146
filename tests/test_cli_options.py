"""squeeze.cli.options: command-line options made from option models (flag, default, help written
once in the model), spliced into a command's signature where typer reads them."""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Optional

import pytest
import typer
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from squeeze.cli.options import cli_type, model_options, with_options
from squeeze.options import MethodOptions, option
from squeeze.recipes import DistillStage

runner = CliRunner()


class Knobs(MethodOptions):
    damp_percent: float = option(0.01, "Damping, as a fraction of the mean.")
    act_order: bool = option(True, "Quantize the loudest inputs first.", flag="--act-order/--no-act-order")
    smooth_fallback: bool = option(False, "Quantize without smoothing where nothing folds.")
    bits: Optional[int] = option(None, "Weight bits (default 8).")


class Layers(BaseModel):
    targets: tuple[str, ...] = Field((), description="Layers to touch (repeatable).", json_schema_extra={"flag": "--target"})
    layer_sparsity: dict[str, float] = Field({}, description="PATTERN=SPARSITY, repeatable.")
    group: int = Field(3, description="Not on the command line here.")


def command() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @with_options(model_options(Knobs), model=model_options(Layers, exclude=("group",)))
    def run(
        model: Annotated[str, typer.Argument(help="The model.")],
        quiet: Annotated[bool, typer.Option("--quiet", help="Say nothing.")] = False,
        **values: Any,
    ) -> None:
        print(repr(dict(model=model, quiet=quiet, **values)))

    @app.callback()
    def main() -> None:
        """A test app."""

    return app


def test_flags_defaults_and_help_come_from_the_model() -> None:
    app = command()
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for words in (
        "--damp-percent", "Damping, as a fraction of the mean. [default: 0.01]", "--act-order --no-act-order",
        "--smooth-fallback", "--bits", "Weight bits (default 8).", "--target", "Layers to touch (repeatable).",
        "--layer-sparsity", "--quiet",
    ):
        assert words in text, words
    assert "--no-smooth-fallback" not in text and "--group" not in text
    # own parameters keep their places; the placed group follows ``model``, the rest take **values' place
    order = [text.index(flag) for flag in ("--target", "--layer-sparsity", "--quiet", "--damp-percent", "--act-order", "--bits")]
    assert order == sorted(order)


def test_values_arrive_as_keywords_typed_as_the_model_says() -> None:
    app = command()
    result = runner.invoke(app, ["run", "m", "--damp-percent", "0.1", "--no-act-order", "--target", "a", "--target", "b",
                                 "--layer-sparsity", "x=0.5", "--bits", "4"])
    assert result.exit_code == 0, result.output
    assert eval(result.stdout) == {
        "model": "m", "quiet": False, "damp_percent": 0.1, "act_order": False, "smooth_fallback": False, "bits": 4,
        "targets": ["a", "b"], "layer_sparsity": ["x=0.5"],
    }
    result = runner.invoke(app, ["run", "m"])
    assert eval(result.stdout)["damp_percent"] == 0.01 and eval(result.stdout)["targets"] == []


def test_cli_types() -> None:
    assert cli_type(int | None) == Optional[int]
    assert cli_type(tuple[str, ...]) == list[str]
    assert cli_type(tuple[str, ...] | None) == Optional[list[str]]
    assert cli_type(dict[str, float]) == list[str]
    assert cli_type(float) is float


def test_mistakes_in_a_command_declaration_are_caught() -> None:
    with pytest.raises(ValueError, match="no field 'nope'"):
        model_options(Knobs, only=("nope",))

    def twice(damp_percent: float = 0.0, **values: Any) -> None: ...

    with pytest.raises(TypeError, match="damp_percent twice"):
        with_options(model_options(Knobs))(twice)

    def nowhere(model: str, **values: Any) -> None: ...

    with pytest.raises(TypeError, match="no parameter data"):
        with_options(data=model_options(Knobs))(nowhere)


def test_distill_reads_its_options_from_the_recipe_stage() -> None:
    from squeeze.cli.passes import distill

    parameters = inspect.signature(distill).parameters
    for name in ("temperature", "steps", "grad_accum", "cache_samples", "batch_size"):
        field = DistillStage.model_fields[name]
        assert parameters[name].default == field.default
        assert parameters[name].annotation.__metadata__[0].help == field.description
