"""squeeze bench: baselines, tolerances, history, and a deliberately worsened GPTQ caught as a regression."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from squeeze import bench
from squeeze.cli import app
from squeeze.errors import SqueezeError
from squeeze.quant import gptq

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
runner = CliRunner()


def test_compare_applies_direction_tolerance_and_slack() -> None:
    old = {"perplexity": 10.0, "kl_divergence": 0.01, "top1_agreement": 0.9, "disk_bytes": 1000.0, "time_ratio": 2.0}
    same = bench.compare("c", dict(old), old, {})
    assert [verdict for *_, verdict in same.rows] == ["ok"] * 5 and not same.regressed
    worse = bench.compare("c", old | {"perplexity": 10.2, "top1_agreement": 0.88, "time_ratio": 3.1}, old, {})
    verdicts = {metric: verdict for metric, *_, verdict in worse.rows}
    assert verdicts == {"perplexity": "REGRESSED", "kl_divergence": "ok", "top1_agreement": "REGRESSED", "disk_bytes": "ok", "time_ratio": "REGRESSED"}
    # a KL change under the absolute slack is noise, however large relatively
    assert not bench.compare("c", old | {"kl_divergence": 0.0105 + 1e-5 * 0.9}, old, {}).regressed
    assert bench.compare("c", old | {"perplexity": 10.2}, old, {"perplexity": 0.05}).rows[0][-1] == "ok"
    assert bench.compare("c", old | {"perplexity": 9.0}, old, {}).rows[0][-1] == "better"
    assert bench.compare("c", dict(old), None, {}).rows[0][-1] == "new"
    encoder = {"embedding_cosine": 0.95, "disk_bytes": 1000.0}
    assert bench.compare("c", encoder | {"embedding_cosine": 0.94}, encoder, {}).regressed
    assert not bench.compare("c", encoder | {"embedding_cosine": 0.947}, encoder, {}).regressed


@pytest.fixture
def cases(tmp_path: Path, tiny_llama4_dir: Path, small_text: Path) -> Path:
    path = tmp_path / "benchmarks" / "cases.yaml"
    path.parent.mkdir()
    path.write_text(f"""
tolerances:
  time_ratio: 20  # a tiny model runs in a second: its timing is all noise
cases:
  - name: tiny-gptq
    model: {tiny_llama4_dir}
    recipe: {RECIPES / 'w4a16-gptq.yaml'}
    data: {small_text}
    seq_len: 32
    eval_tokens: 512
    overrides: {{calib_samples: 16}}
  - name: tiny-wanda
    suites: [full]
    model: {tiny_llama4_dir}
    recipe: {RECIPES / 'sparse50-wanda.yaml'}
    data: {small_text}
    seq_len: 32
    eval_tokens: 256
    overrides: {{calib_samples: 8}}
""")
    return path


def test_a_worsened_gptq_fails_the_suite(cases: Path, monkeypatch) -> None:
    result = runner.invoke(app, ["bench", "--cases", str(cases)])
    assert result.exit_code == 2 and "no baseline for tiny-gptq" in result.output  # nothing recorded yet: refused up front
    result = runner.invoke(app, ["bench", "--cases", str(cases), "--update"])
    assert result.exit_code == 0, result.output
    baseline = json.loads((cases.parent / "baselines" / "ci.json").read_text())
    assert set(baseline["cases"]) == {"tiny-gptq"} and baseline["reference_op_seconds"] > 0
    assert baseline["cases"]["tiny-gptq"]["kl_divergence"] > 0
    assert "| tiny-gptq |" in (cases.parent / "README.md").read_text()  # the baseline's table, beside the cases

    result = runner.invoke(app, ["bench", "--cases", str(cases)])  # the same code again: within tolerance
    assert result.exit_code == 0, result.output

    # a regression in the GPTQ kernel: damping absurdly large, so the Hessian hardly matters and
    # GPTQ degrades toward round-to-nearest
    solve = gptq._inverse_cholesky
    monkeypatch.setattr(gptq, "_inverse_cholesky", lambda hessian, damp_percent: solve(hessian, damp_percent * 1e4))
    run = bench.run_suite(cases, "ci")
    regressed = {metric for metric, *_, verdict in run.outcomes[0].rows if verdict == "REGRESSED"}
    assert "kl_divergence" in regressed, run.outcomes[0].rows
    result = runner.invoke(app, ["bench", "--cases", str(cases)])
    assert result.exit_code == 1
    assert "REGRESSED" in result.output and "regression in tiny-gptq" in result.output


def test_full_suite_appends_history(cases: Path) -> None:
    for _ in range(2):
        result = runner.invoke(app, ["bench", "--cases", str(cases), "--suite", "full", "--only", "tiny-wanda", "--update", "--json"])
        assert result.exit_code == 0, result.output
    lines = (cases.parent / "history" / "full.jsonl").read_text().splitlines()
    assert len(lines) == 2
    record = json.loads(lines[-1])
    assert set(record["cases"]) == {"tiny-wanda"} and record["machine"] and record["commit"]


@pytest.mark.parametrize(("args", "words"), [
    (["--only", "nope"], "no case named nope"),
    (["--suite", "nightly"], "unknown suite"),
])
def test_bad_bench_options(cases: Path, args: list[str], words: str) -> None:
    result = runner.invoke(app, ["bench", "--cases", str(cases), *args])
    assert result.exit_code == 2 and words in result.output


def test_bad_cases_files(tmp_path: Path) -> None:
    with pytest.raises(SqueezeError, match="does not exist"):
        bench.load_cases(tmp_path / "none.yaml")
    path = tmp_path / "cases.yaml"
    path.write_text("cases:\n  - name: a\n    model: smollm2\n    recipe: r.yaml\n    sutes: [ci]\n")
    with pytest.raises(SqueezeError, match="sutes"):
        bench.load_cases(path)
    path.write_text("tolerances: {speed: 1}\ncases: []\n")
    with pytest.raises(SqueezeError, match="unknown tolerance"):
        bench.load_cases(path)
    path.write_text(f"cases:\n  - name: a\n    model: smollm2\n    recipe: {RECIPES / 'w4a16-gptq.yaml'}\n    overrides: {{steps: 3}}\n")
    with pytest.raises(SqueezeError, match="no stage of"):
        bench.run_suite(path, "ci")


def test_a_case_with_a_missing_model_fails_before_any_case_runs(cases: Path, tmp_path: Path) -> None:
    text = cases.read_text().replace("  - name: tiny-wanda\n    suites: [full]\n    model: ", f"  - name: tiny-wanda\n    suites: [ci]\n    model: {tmp_path / 'gone'}\n    #")
    cases.write_text(text)
    (cases.parent / "baselines").mkdir()
    (cases.parent / "baselines" / "ci.json").write_text('{"cases": {"tiny-gptq": {}, "tiny-wanda": {}}}')
    ran = []
    with pytest.raises(SqueezeError, match="gone"):
        bench.run_suite(cases, "ci", on_case=lambda *args: ran.append(args))
    assert not ran
