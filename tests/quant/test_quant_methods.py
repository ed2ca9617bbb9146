"""The method registry: names, options (defaults, bounds, report settings) and the recipe stage
built from them, so that each default and bound is written once, in its method's file."""

from __future__ import annotations

import pytest

from squeeze.errors import OptionError, SqueezeError, cli_spelling, recipe_spelling
from squeeze.options import MethodOptions, MethodRegistry, field_meta, option
from squeeze.quant.apply import QuantizeConfig
from squeeze.quant.methods import METHODS
from squeeze.quant.methods.base import QuantMethod, SchemeDefaults
from squeeze.quant.scheme import scheme_from_options
from squeeze.recipes import QuantizeStage

W8A8 = scheme_from_options(bits=8, act="per-token")
# what the report and the checkpoint's metadata record for each method, in this order
SETTINGS = {
    "rtn": {},
    "gptq": {"damp_percent": 0.05, "block_size": 128, "act_order": True, "group_aware": True, "clip_search": 48, "clip_refit": False, "true_sequential": True},
    "smoothquant": {"alpha": 0.5, "alpha_search": False},
    "awq": {"awq_grid": 20, "awq_clip": True},
}


def config(method: str, **options) -> QuantizeConfig:
    return QuantizeConfig(scheme=W8A8 if method == "smoothquant" else scheme_from_options(), method=method, options=options)


def test_the_registry_names_every_method_in_order() -> None:
    assert METHODS.names()[:4] == ("rtn", "gptq", "smoothquant", "awq")  # the built-in ones first, in the order of --method
    assert all(METHODS.get(name).name == name for name in METHODS.names())


def test_an_unknown_method_names_the_choices() -> None:
    with pytest.raises(SqueezeError, match=r"unknown quantization method 'sgd'; choose one of: rtn, gptq, smoothquant, awq\b"):
        QuantizeConfig(method="sgd")


@pytest.mark.parametrize("method", list(SETTINGS))
def test_defaults_and_report_settings(method: str) -> None:
    made = config(method)
    assert isinstance(made.options, METHODS.get(method).Options)
    assert made.options.settings() == SETTINGS[method]
    assert list(made.options.settings()) == list(SETTINGS[method])


def test_options_come_as_a_mapping_a_model_or_none() -> None:
    as_dict = config("gptq", damp_percent=0.05, act_order=False)
    as_model = QuantizeConfig(scheme=as_dict.scheme, method="gptq", options=as_dict.options)
    assert as_model.options is as_dict.options and as_model == as_dict
    assert as_dict.options.damp_percent == 0.05 and as_dict.options.block_size == 128  # the rest: defaults
    assert QuantizeConfig(method="gptq", options=None).options == METHODS.get("gptq").Options()
    # SmoothQuant records alpha only; the fallback switch is not a setting of the result
    assert config("smoothquant", smooth_fallback=True).options.settings() == {"alpha": 0.5, "alpha_search": False}


@pytest.mark.parametrize(
    ("method", "option_name", "value", "words"),
    [
        ("gptq", "damp_percent", 0, "damp percent must be in (0, 1]"),
        ("gptq", "damp_percent", 1.5, "damp percent must be in (0, 1]"),
        ("gptq", "block_size", 0, "GPTQ block size must be positive"),
        ("smoothquant", "alpha", 1.5, "SmoothQuant alpha must be in [0, 1]"),
        ("smoothquant", "alpha", -0.1, "SmoothQuant alpha must be in [0, 1]"),
        ("awq", "awq_grid", 1, "AWQ grid needs at least 2 ratios"),
        ("gptq", "act_order", "sometimes", "act_order"),
    ],
)
def test_a_value_out_of_bounds_names_the_option(method: str, option_name: str, value, words: str) -> None:
    with pytest.raises(OptionError) as error:
        config(method, **{option_name: value})
    assert error.value.options == (option_name,)
    assert words in str(error.value)
    assert cli_spelling(option_name) in error.value.render(cli_spelling)
    assert recipe_spelling(option_name) in error.value.render(recipe_spelling)


def test_an_option_of_another_method_is_refused() -> None:
    with pytest.raises(OptionError) as error:
        config("rtn", damp_percent=0.05)
    assert error.value.options == ("damp_percent",) and "unknown option" in str(error.value)


def test_the_scheme_checks_name_the_options_to_change() -> None:
    with pytest.raises(OptionError) as error:
        QuantizeConfig(scheme=scheme_from_options(bits=8), method="smoothquant")
    assert "add --act per-token" in error.value.render(cli_spelling)
    with pytest.raises(OptionError) as error:
        QuantizeConfig(scheme=W8A8, method="awq")
    assert "use method: smoothquant" in error.value.render(recipe_spelling)


def test_calibration_is_the_methods_call() -> None:
    assert not QuantizeConfig().needs_calibration
    assert QuantizeConfig(scheme=scheme_from_options(act="per-tensor")).needs_calibration  # static activation scales
    assert not QuantizeConfig(scheme=W8A8).needs_calibration  # dynamic ones need no text
    assert all(config(name).needs_calibration for name in ("gptq", "smoothquant", "awq"))


def test_the_stage_holds_every_methods_options_with_their_defaults() -> None:
    fields = QuantizeStage.model_fields
    for method in METHODS:
        for name, declared in method.Options.model_fields.items():
            assert fields[name].default == declared.default, name
            assert fields[name].description == declared.description, name
            assert field_meta(fields[name]).get("flag") == field_meta(declared).get("flag"), name
    assert field_meta(fields["act_order"])["flag"] == "--act-order/--no-act-order"
    assert all(field.description for field in fields.values())  # every option has its --help text
    stage = QuantizeStage(method="gptq", damp_percent=0.05, alpha=0.9)  # flat recipe keys, as before
    made = stage.config(None)
    assert made.options.damp_percent == 0.05 and made.options.settings()["block_size"] == 128


def test_the_stage_takes_scheme_defaults_from_the_method() -> None:
    assert METHODS.get("awq").defaults == SchemeDefaults(mode="per-group", bits=4, asym=True)
    awq = QuantizeStage(method="awq").resolved(None)
    assert (awq.mode, awq.bits, awq.group_size, awq.asym) == ("per-group", 4, 128, True)
    rtn = QuantizeStage().resolved(None)
    assert (rtn.mode, rtn.bits, rtn.group_size, rtn.asym) == ("per-channel", 8, None, False)
    assert QuantizeStage(method="awq").label() == "awq-w4a16" and QuantizeStage(format="bnb-nf4").label() == "nf4"
    assert QuantizeStage(method="no-such").resolved(None).bits == 8  # the config, not the stage, reports the name


class _Damped(MethodOptions):
    damp_percent: float = option(0.02, "another default")


class _Damping(QuantMethod):
    name = "damping"
    summary = "damping"
    Options = _Damped


def test_a_shared_option_must_be_declared_identically() -> None:
    registry: MethodRegistry[QuantMethod] = MethodRegistry("quantization method", "method")
    registry.add("gptq", METHODS.get("gptq"))
    with pytest.raises(ValueError, match="declares option 'damp_percent' unlike"):
        registry.add("damping", _Damping())
    registry.add("awq", METHODS.get("awq"))  # no shared options
    assert list(registry.options())[:2] == ["damp_percent", "block_size"]
    assert list(registry.fields()) == ["damp_percent", "block_size", "act_order", "group_aware", "clip_search", "clip_refit", "true_sequential", "awq_grid", "awq_clip"]
    with pytest.raises(ValueError, match="'block_size' has the name of a common option"):
        registry.fields(reserved=["method", "block_size"])
