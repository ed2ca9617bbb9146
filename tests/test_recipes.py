"""Recipes: parsing with file:line errors, whole-recipe validation, the runner, resume, the summary,
and every shipped recipe run on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from squeeze import chain
from squeeze.cli import app
from squeeze.errors import SqueezeError
from squeeze.chain import plan_recipe
from squeeze.recipes import DistillStage, PruneStage, QuantizeStage, RecipeError, load_recipe, recipe_from_stages

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(p.stem for p in RECIPES.glob("*.yaml"))
SMALL = dict(seq_len=32, eval_tokens=256)


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    return caught.value.problems


def test_every_problem_is_reported_with_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, """name: broken
seq_len: 128
stages:
  - prune:
      method: wanda
      sparsty: 0.5
  - quantize:
      bits: four
  - quantise: {method: gptq}
colour: blue
""")
    found = problems(path)
    assert len(found) == 4, found
    assert any(p.startswith(f"{path}:6:") and "'sparsty'" in p and "did you mean 'sparsity'" in p for p in found)
    assert any(p.startswith(f"{path}:8:") and "bits" in p and "'four'" in p for p in found)
    assert any(p.startswith(f"{path}:9:") and "unknown pass 'quantise'" in p and "'quantize'" in p for p in found)
    assert any(p.startswith(f"{path}:10:") and "'colour'" in p for p in found)


@pytest.mark.parametrize(("text", "line", "words"), [
    ("stages: [\n  {prune: {method: wanda}\n", 3, "not valid YAML"),
    ("stages: []\n", 1, "non-empty list"),
    ("name: x\n", 1, "'stages' must be"),
    ("stages:\n  - prune: 0.5\n", 2, "options must be a mapping"),
    ("stages:\n  - {prune: {}, quantize: {}}\n", 2, "must be one pass"),
    ("seq_len: 0\nstages:\n  - prune: {}\n", 1, "positive integer"),
    ("stages:\n  - distill:\n      steps: 0\n", 3, "greater than or equal to 1"),
])
def test_malformed_recipes(tmp_path: Path, text: str, line: int, words: str) -> None:
    path = write(tmp_path, text)
    found = problems(path)
    assert found[0].startswith(f"{path}:{line}:"), found
    assert words in found[0]


def test_numbers_in_exponent_notation_are_numbers(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "stages:\n  - distill: {student: 'layers:2', tokens: 2e6}\n"))
    assert recipe.stages[0].tokens == 2_000_000.0
    assert recipe.stages[0].config(seq_len=512).steps == -(-2_000_000 // (4 * 512))


def test_missing_recipe_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(SqueezeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_impossible_combinations_are_caught_before_anything_runs(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = write(tmp_path, """stages:
  - distill: {steps: 2}
  - quantize: {method: gptq, bits: 4, mode: per-group, group_size: 48}
  - prune: {method: wanda, pattern: "2:4", sparsity: 0.3}
  - distill: {student: "layers:9", steps: 2, alpha: 0, teacher_cache: cache}
""")
    with pytest.raises(RecipeError) as caught:
        plan_recipe(load_recipe(path), str(tiny_llama_dir))
    found = caught.value.problems
    assert found[0].startswith(f"{path}:2:") and "no previous model" in found[0]
    assert any(f"{path}:3:" in p and "group size 48 does not divide" in p for p in found), found
    assert any(f"{path}:4:" in p and "quantize must be the last stage" in p for p in found), found
    assert any(f"{path}:4:" in p and "2:4" in p for p in found), found
    assert any(f"{path}:5:" in p and "layers:9" in p for p in found), found


def test_a_shipped_recipe_with_a_bad_model_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(SqueezeError, match="nowhere"):
        chain.run_recipe(RECIPES / "w4a16-gptq.yaml", str(tmp_path / "nowhere"), tmp_path / "out")
    assert not list(tmp_path.iterdir())


def shrunk(name: str):
    """A shipped recipe with its calibration and training cut to tiny-model size (the stages,
    methods and options are the shipped ones)."""
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    stages = []
    for stage in recipe.stages:
        if isinstance(stage, DistillStage):
            stage = stage.model_copy(update={"tokens": None, "steps": 4})
        else:
            stage = stage.model_copy(update={"calib_samples": 8})
        stages.append(stage)
    return recipe_from_stages(stages, name=recipe.name, **SMALL)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_runs_on_a_tiny_model(name: str, tmp_path: Path, tiny_llama4_dir: Path, small_text: Path) -> None:
    recipe = load_recipe(RECIPES / f"{name}.yaml")  # parses as shipped
    assert recipe.name == name and recipe.description
    plan_recipe(recipe, str(tiny_llama4_dir))  # and validates as shipped against a model
    out = tmp_path / "run"
    summary = chain.run_recipe(shrunk(name), str(tiny_llama4_dir), out, data=str(small_text))
    assert not (tmp_path / "run.partial").exists()
    assert [r["name"] for r in summary["rows"][1:]] == [s["folder"] for s in summary["stages"]]
    assert {"summary.json", "summary.md", "summary.png"} <= {p.name for p in out.iterdir()}
    original = summary["rows"][0]
    for row, stage in zip(summary["rows"][1:], recipe.stages):
        folder = out / row["name"]
        report = json.loads((folder / "report.json").read_text())
        assert report["pass_name"] == stage.pass_name
        assert row["perplexity"] > 0 and row["kl_divergence"] >= 0
        assert row["compared_with"] == original["name"]  # every stage against the original
        assert list(folder.glob("*.safetensors"))
    last = out / summary["rows"][-1]["name"]
    config = json.loads((last / "config.json").read_text())
    if name == "distill-half-depth":
        assert config["num_hidden_layers"] == 2  # half of 4
    if any(isinstance(s, QuantizeStage) for s in recipe.stages):
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
        assert summary["rows"][-1]["disk_bytes"] < original["disk_bytes"]
    if any(isinstance(s, PruneStage) for s in recipe.stages):
        pruned = out / summary["rows"][1]["name"]
        assert json.loads((pruned / "report.json").read_text())["sparsity"]["sparsity"] >= 0.49


def test_prune_distill_quantize_keeps_zeros_and_loads_without_squeeze(tmp_path: Path, tiny_llama4_dir: Path, small_text: Path) -> None:
    out = tmp_path / "run"
    chain.run_recipe(shrunk("prune-distill-quantize"), str(tiny_llama4_dir), out, data=str(small_text))
    distilled = next(out.glob("02-distill-*"))
    report = json.loads((distilled / "report.json").read_text())
    assert any("kept their zeros" in note for note in report["notes"])
    quantized = next(out.glob("03-quantize-*"))
    model = transformers.AutoModelForCausalLM.from_pretrained(quantized)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(model(ids).logits).all()
    weights = load_file(next(quantized.glob("*.safetensors")))
    assert any(name.endswith("weight_packed") for name in weights)


def test_stages_from_python_and_stage_reports_against_the_original(tmp_path: Path, tiny_llama_dir: Path, small_text: Path) -> None:
    stages = [PruneStage(method="magnitude", sparsity=0.5), QuantizeStage(bits=4, mode="per-group", group_size=32)]
    summary = chain.run_recipe(stages, str(tiny_llama_dir), tmp_path / "out", data=str(small_text), **SMALL)
    assert [s["pass"] for s in summary["stages"]] == ["prune", "quantize"]
    quantized = json.loads((tmp_path / "out" / summary["stages"][1]["folder"] / "report.json").read_text())
    pruned = json.loads((tmp_path / "out" / summary["stages"][0]["folder"] / "report.json").read_text())
    # the quantize stage read the pruned model but compared with the original
    assert quantized["accuracy"]["perplexity_before"] == pytest.approx(pruned["accuracy"]["perplexity_before"])
    assert quantized["accuracy"]["reference"].startswith("original")
    assert quantized["size"]["disk_bytes_before"] == pruned["size"]["disk_bytes_before"]  # sizes: the input, held dense
    # mappings as in a YAML file work too, with the same checks
    as_dicts = recipe_from_stages([{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": None}])
    assert as_dicts.stages == (PruneStage(method="magnitude", sparsity=0.5), QuantizeStage())
    with pytest.raises(RecipeError) as caught:
        recipe_from_stages([{"prune": {"sparsty": 0.5}}, 5])
    assert caught.value.problems[0].startswith("stage 1 (prune): unknown option 'sparsty'")
    assert "not a pass" in caught.value.problems[1]


def test_interrupted_run_keeps_finished_stages_and_resumes(tmp_path: Path, tiny_llama_dir: Path, small_text: Path, monkeypatch) -> None:
    stages = [PruneStage(sparsity=0.5), DistillStage(steps=2, batch_size=2, data=str(small_text)), QuantizeStage()]
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    real_quantize = chain.PASSES["quantize"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(chain.PASSES, "quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        chain.run_recipe(stages, str(tiny_llama_dir), out, data=str(small_text), **SMALL)
    assert not out.exists()
    assert sorted(p.name for p in partial.iterdir()) == ["01-prune-magnitude-50", "02-distill-kd"]
    with pytest.raises(SqueezeError, match="pass resume to continue it, or overwrite to start over"):  # Python's words
        chain.run_recipe(stages, str(tiny_llama_dir), out, data=str(small_text), **SMALL)

    monkeypatch.setitem(chain.PASSES, "quantize", real_quantize)
    seen = []
    distilled = load_file(partial / "02-distill-kd" / "model.safetensors")
    chain.run_recipe(stages, str(tiny_llama_dir), out, data=str(small_text), resume=True,
                   on_stage=lambda entry, reused: seen.append((entry.index, reused)), **SMALL)
    assert seen == [(0, True), (1, True), (2, False)]
    assert not partial.exists()
    kept = load_file(out / "02-distill-kd" / "model.safetensors")
    assert all(torch.equal(kept[k], distilled[k]) for k in distilled)

    # a changed stage and everything after it run again; the stages before are reused
    monkeypatch.setitem(chain.PASSES, "quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        chain.run_recipe(stages, str(tiny_llama_dir), tmp_path / "again", data=str(small_text), **SMALL)
    monkeypatch.setitem(chain.PASSES, "quantize", real_quantize)
    changed = [stages[0], stages[1].model_copy(update={"steps": 3}), stages[2]]
    seen.clear()
    chain.run_recipe(changed, str(tiny_llama_dir), tmp_path / "again", data=str(small_text), resume=True,
                   on_stage=lambda entry, reused: seen.append((entry.index, reused)), **SMALL)
    assert seen == [(0, True), (1, False), (2, False)]


def test_a_failing_first_stage_leaves_nothing(tmp_path: Path, tiny_llama_dir: Path, small_text: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise SqueezeError("disk full")

    monkeypatch.setitem(chain.PASSES, "prune", broken)
    with pytest.raises(SqueezeError, match=r"stage 1 \(01-prune-magnitude-50\): disk full"):
        chain.run_recipe([PruneStage(sparsity=0.5)], str(tiny_llama_dir), tmp_path / "out", data=str(small_text), **SMALL)
    assert not list(tmp_path.iterdir())


runner = CliRunner()


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, tiny_llama_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", str(RECIPES / "prune-distill-quantize.yaml"), "--model", str(tiny_llama_dir), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert [s["folder"] for s in plan["stages"]] == ["01-prune-wanda-2of4", "02-distill-kd", "03-quantize-gptq-w4a16"]
    assert plan["stages"][0]["calibration_tokens"] == 128 * 256  # windows capped at the tiny model's 256 positions
    assert plan["stages"][0]["evaluation_tokens"] == 16384
    assert plan["stages"][1]["training_tokens"] >= 131072 and plan["stages"][1]["input"] == "01-prune-wanda-2of4"
    assert all(s["memory_estimate_bytes"] > 0 for s in plan["stages"])
    result = runner.invoke(app, ["run", str(RECIPES / "w4a16-gptq.yaml"), "--model", str(tiny_llama_dir), "--dry-run"])
    assert result.exit_code == 0 and "nothing run" in result.output
    assert not list(tmp_path.iterdir())


def test_cli_bad_recipe_is_exit_2_with_file_and_line(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = write(tmp_path, "stages:\n  - quantize: {method: gptq, bit: 4}\n")
    result = runner.invoke(app, ["run", str(path), "--model", str(tiny_llama_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert f"{path}:2:" in result.output and "did you mean 'bits'" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_cli_run_and_report(tmp_path: Path, tiny_llama_dir: Path, small_text: Path) -> None:
    path = write(tmp_path, "name: tiny\nseq_len: 32\neval_tokens: 256\nstages:\n  - prune: {sparsity: 0.5}\n")
    common = ["--model", str(tiny_llama_dir), "--data", str(small_text)]
    result = runner.invoke(app, ["run", str(path), *common, "--out", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["recipe"] == "tiny"
    result = runner.invoke(app, ["run", str(path), *common, "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "already exists" in result.output
    result = runner.invoke(app, ["quantize", str(tiny_llama_dir), "--bits", "4", "--out", str(tmp_path / "b"), "--data", str(small_text),
                                 "--seq-len", "32", "--eval-tokens", "256", "--quiet"])
    assert result.exit_code == 0, result.output
    plot = tmp_path / "cmp.png"
    result = runner.invoke(app, ["report", str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["pass_name"] for r in rows] == ["", "prune", "quantize"]  # one original, shared by both runs
    assert plot.stat().st_size > 10_000
    result = runner.invoke(app, ["report", str(tmp_path / "a"), "--plot", str(plot)])
    assert result.exit_code == 2 and "already exists" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "a"), "--plot", str(tmp_path / "no" / "such.png")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["report", str(tmp_path), "--no-plot"])
    assert result.exit_code == 2 and "neither summary.json" in result.output


def test_a_failing_later_stage_names_what_was_kept(tmp_path: Path, tiny_llama_dir: Path, small_text: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise SqueezeError("disk full")

    monkeypatch.setitem(chain.PASSES, "quantize", broken)
    with pytest.raises(SqueezeError, match=r"stage 2 \(02-quantize-rtn-w8a16\): disk full; the finished stages are kept in .*out\.partial.*rerun with resume"):
        chain.run_recipe([PruneStage(sparsity=0.5), QuantizeStage()], str(tiny_llama_dir), tmp_path / "out", data=str(small_text), **SMALL)
    assert sorted(p.name for p in (tmp_path / "out.partial").iterdir()) == ["01-prune-magnitude-50"]


@pytest.mark.parametrize(
    "options, python, recipe, cli",
    [
        (
            {"steps": 3, "tokens": 100},
            "give steps or tokens, not both",
            "give steps: or tokens:, not both",
            "give --steps or --tokens, not both",
        ),
        (
            {"layer_map": "0:1"},
            "layer_map pairs hidden states for the hidden-state loss: set hidden_loss cosine or mse",
            "layer_map: pairs hidden states for the hidden-state loss: set hidden_loss: cosine or mse",
            "--layer-map pairs hidden states for the hidden-state loss: set --hidden-loss cosine or mse",
        ),
    ],
)
def test_an_option_error_names_options_in_the_callers_words(
    options: dict, python: str, recipe: str, cli: str, tmp_path: Path, tiny_llama_dir: Path,
) -> None:
    # Python: the keyword arguments themselves
    with pytest.raises(SqueezeError) as caught:
        DistillStage(student="layers:1", **options).config(seq_len=32)
    assert str(caught.value) == python
    # a recipe: its keys, on the stage's line
    text = "stages:\n  - distill:\n      student: layers:1\n" + "".join(f"      {k}: {v!r}\n" for k, v in options.items())
    with pytest.raises(RecipeError) as caught:
        plan_recipe(load_recipe(write(tmp_path, text)), str(tiny_llama_dir))
    assert caught.value.problems == [f"{tmp_path / 'recipe.yaml'}:2: stage 1 (distill): {recipe}"]
    # the command line: its flags
    flags = [part for k, v in options.items() for part in (f"--{k.replace('_', '-')}", str(v))]
    result = runner.invoke(app, ["distill", str(tiny_llama_dir), "layers:1", *flags, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and f"error: {cli}" in " ".join(result.stderr.split())
