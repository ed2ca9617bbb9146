"""The pruning-method registry: names, SparseGPT's options (defaults, bounds, report settings) and
the recipe stage built from them."""

from __future__ import annotations

import pytest

from squeeze.errors import OptionError, SqueezeError, cli_spelling
from squeeze.options import field_meta
from squeeze.prune.apply import PruneConfig
from squeeze.prune.methods import PRUNE_METHODS
from squeeze.recipes import PruneStage

SETTINGS = {"magnitude": {}, "wanda": {}, "sparsegpt": {"block_size": 128, "damp_percent": 0.01, "mask_per_row": True, "true_sequential": True}}


def test_the_registry_names_every_method_in_order() -> None:
    assert PRUNE_METHODS.names() == ("magnitude", "wanda", "sparsegpt")
    assert [m.needs_calibration for m in PRUNE_METHODS] == [False, True, True]


def test_an_unknown_method_names_the_choices() -> None:
    with pytest.raises(SqueezeError, match=r"unknown pruning method 'obs'; choose one of: magnitude, wanda, sparsegpt"):
        PruneConfig(method="obs")


@pytest.mark.parametrize("method", list(SETTINGS))
def test_defaults_and_report_settings(method: str) -> None:
    made = PruneConfig(method=method)
    assert isinstance(made.options, PRUNE_METHODS.get(method).Options)
    assert list(made.options.settings().items()) == list(SETTINGS[method].items())
    assert made.needs_calibration == PRUNE_METHODS.get(method).needs_calibration


@pytest.mark.parametrize(
    ("option_name", "value", "words"),
    [
        ("damp_percent", 0, "damp percent must be in (0, 1]"),
        ("damp_percent", 2, "damp percent must be in (0, 1]"),
        ("block_size", 0, "SparseGPT block size must be positive"),
    ],
)
def test_a_value_out_of_bounds_names_the_option(option_name: str, value, words: str) -> None:
    with pytest.raises(OptionError) as error:
        PruneConfig(method="sparsegpt", options={option_name: value})
    assert error.value.options == (option_name,) and words in str(error.value)
    assert cli_spelling(option_name) in error.value.render(cli_spelling)


def test_wanda_takes_no_sparsegpt_options() -> None:
    with pytest.raises(OptionError, match="unknown option"):
        PruneConfig(method="wanda", options={"block_size": 64})


def test_the_stage_holds_every_methods_options_with_their_defaults() -> None:
    fields = PruneStage.model_fields
    for method in PRUNE_METHODS:
        for name, declared in method.Options.model_fields.items():
            assert fields[name].default == declared.default and fields[name].description == declared.description, name
    assert all(field.description for field in fields.values())
    assert field_meta(fields["targets"])["flag"] == "--target"
    made = PruneStage(method="sparsegpt", block_size=32).config()  # flat recipe keys, as before
    assert made.options.settings() == {"block_size": 32, "damp_percent": 0.01, "mask_per_row": True, "true_sequential": True}
    assert PruneStage(method="wanda", block_size=32).config().options.settings() == {}  # not Wanda's: not passed on
