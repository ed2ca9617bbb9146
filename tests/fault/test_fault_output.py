"""Output folders under faults (issue #18, defects 6-8): a run killed while writing leaves nothing
the next run keeps, a full disk is one line, and an output that would replace the current
directory or an input model is refused before anything is read."""

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from typer.testing import CliRunner

import squeeze.passes.common as common
import squeeze.tensorfiles as files
from squeeze.cli import app
from squeeze.errors import SqueezeError
from squeeze.models import meta_model, resolve_model
from squeeze.models.output import ASIDE, STAGING, Owner, atomic_output_dir, beside, check_output_dir, sweep_stale
from squeeze.passes.quantize import QuantizeStep
from squeeze.passes.skeleton import least_output_bytes
from squeeze.quant.config import QuantizeConfig
from squeeze.tensorfiles import save_tensors_file

runner = CliRunner()
FAST = ["--eval-tokens", "256", "--seq-len", "32", "--calib-samples", "2", "--no-eval", "--generation-prompts", "0", "-q"]

# Enters an output folder through the CLI's call (as every command does), writes a file, says
# where, and waits to be killed.
WRITER = """
import sys, time
from pathlib import Path
import typer
from squeeze.cli.app import call
from squeeze.models import atomic_output_dir

def write(out):
    with atomic_output_dir(Path(out)) as folder:
        (folder / "config.json").write_text("{}")
        print(folder, flush=True)
        time.sleep(300)

try:
    call(write, sys.argv[1])
except typer.Exit as exc:
    sys.exit(exc.exit_code)
"""


def quantize(*args) -> object:
    return runner.invoke(app, ["quantize", *(str(a) for a in args), *FAST], catch_exceptions=False)


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.output
    return [line for line in result.stderr.splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` and its size."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if f".{STAGING}-" in p.name or f".{ASIDE}-" in p.name)


def start_writer(out: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        pytest.fail(f"the writer did not start: {proc.communicate()[1]}")
    staging = Path(line)
    assert (staging / "config.json").is_file() and staging.parent == out.parent
    return proc, staging


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- defect 6: killed runs ------------------------------------------------------------------


def test_sigterm_removes_the_staging_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, staging = start_writer(out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: interrupted; the output is written whole or not at all (SIGTERM)"
    ]
    assert not staging.exists() and list(tmp_path.iterdir()) == []


def test_kill_9_leaves_a_folder_the_next_run_sweeps(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, staging = start_writer(out)
    try:
        check_output_dir(out, overwrite=False)  # a run for the same output while the writer lives
        assert staging.is_dir(), "a live writer's folder was removed"
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert staging.is_dir()  # kill -9 gives no chance to clean up
    with atomic_output_dir(out) as folder:
        assert not staging.exists()
        (folder / "a.txt").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


OWNERS = ["dead", "reused pid", "alive", "other host", "no owner"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([STAGING, ASIDE]), st.sampled_from(OWNERS)), max_size=6))
def test_sweep_removes_exactly_the_folders_of_gone_owners(folders: list[tuple[str, str]]) -> None:
    me = Owner.this_process()
    owners = {
        "dead": Owner(dead_pid(), me.started, me.host),
        "reused pid": Owner(me.pid, me.started - 3600, me.host),
        "alive": me,
        "other host": Owner(dead_pid(), 0, "not-this-host"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        out.mkdir()  # present: a folder moved aside is garbage, not the only copy
        made = {}
        for kind, owner in folders:
            folder = out.parent / f".out.{kind}-{os.urandom(4).hex()}" if owner == "no owner" else beside(out, kind, owners[owner])
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"x")
            made[folder] = owner
        removed = sweep_stale(out)
        gone = {f for f, owner in made.items() if owner in ("dead", "reused pid")}
        assert set(removed) == gone
        assert {f for f in made if f.exists()} == set(made) - gone
        assert out.is_dir() and list(out.iterdir()) == []


def test_an_output_moved_aside_by_a_dead_run_is_put_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = Owner(dead_pid(), Owner.this_process().started, Owner.this_process().host)
    aside = beside(out, ASIDE, dead)
    aside.mkdir()
    (aside / "report.json").write_text("previous")
    partial = beside(out, STAGING, dead)
    partial.mkdir()
    # the run died between moving the old output aside and renaming the new one into place
    with pytest.raises(SqueezeError, match="already exists"):
        check_output_dir(out, overwrite=False)
    assert (out / "report.json").read_text() == "previous"
    assert leftovers(tmp_path) == []


# --- defect 7: a full disk ------------------------------------------------------------------


def test_too_little_free_space_is_refused_before_loading(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=4096))

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the free space was checked")

    monkeypatch.setattr(common, "load_model", never)
    result = quantize(tiny_llama_dir, "--out", tmp_path / "out")
    assert result.exit_code == 2
    [line] = error_lines(result)
    assert line.startswith("error: --out ") and "needs at least" in line and "4.0 KiB free" in line
    assert list(tmp_path.iterdir()) == []


def full_disk(kind: str):
    def write(*args, **kwargs):
        if kind == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return write


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_disk_full_while_writing_is_one_line(kind: str, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("the previous output")
    monkeypatch.setattr(files, "save_file", full_disk(kind))
    result = quantize(tiny_llama_dir, "--out", out, "--overwrite")
    assert result.exit_code == 2
    [line] = error_lines(result)
    assert "filled up while writing --out" in line and "free" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert snapshot(out) == {"report.json": len("the previous output")}


@contextlib.contextmanager
def small_disk(folder: Path, size: int):
    """``folder`` as a tmpfs of ``size`` bytes; True when mounted, False where mounting is not allowed."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def test_a_real_full_disk(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a tmpfs just big enough to pass the check up front but not for the checkpoint; where
    mounting is not allowed, the safetensors write says the disk is full instead."""
    meta = meta_model(resolve_model(str(tiny_llama_dir)))
    least = least_output_bytes(meta, QuantizeStep(QuantizeConfig()).plan(meta), meta.dtype)
    with small_disk(tmp_path / "disk", least + 32 * 1024) as mounted:
        if not mounted:
            monkeypatch.setattr(files, "save_file", full_disk("safetensors"))
        result = quantize(tiny_llama_dir, "--out", tmp_path / "disk" / "out")
        assert result.exit_code == 2
        [line] = error_lines(result)
        assert "filled up while writing --out" in line
        assert list((tmp_path / "disk").iterdir()) == []


def test_other_safetensors_errors_stay_as_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise SafetensorError("Error while serializing: something else")

    monkeypatch.setattr(files, "save_file", fail)
    with pytest.raises(SafetensorError, match="something else"):
        save_tensors_file({}, tmp_path / "a.safetensors")


# --- defect 8: outputs that would delete what the run stands on -------------------------------


@pytest.mark.parametrize(
    ("out", "words"),
    [(".", "is the current directory"), ("..", "holds the current directory"),
     ("MODEL", "is the input model"), ("MODELS", "holds the input model")],
)
def test_output_over_cwd_or_model_is_refused(
    out: str, words: str, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tmp_path / "models" / "llama"
    shutil.copytree(tiny_llama_dir, model)
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    (here / "notes.txt").write_text("keep me")
    monkeypatch.chdir(here)
    before = snapshot(tmp_path)
    target = {"MODEL": model, "MODELS": model.parent}.get(out, out)
    result = quantize(model, "--out", target, "--overwrite")
    assert result.exit_code == 2
    [line] = error_lines(result)
    assert line.startswith("error: --out ") and words in line
    assert snapshot(tmp_path) == before


def test_root_home_and_inside_the_model_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SqueezeError, match="filesystem root"):
        check_output_dir(Path("/"), overwrite=True)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(SqueezeError, match="is the home directory"):
        check_output_dir(home, overwrite=True)
    with pytest.raises(SqueezeError, match="holds the home directory"):
        check_output_dir(tmp_path, overwrite=True)
    gguf = tmp_path / "models" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    with pytest.raises(SqueezeError, match="inside the input model's folder"):
        check_output_dir(home / "q", overwrite=False, inputs=[home])
    with pytest.raises(SqueezeError, match="holds the input model"):
        check_output_dir(gguf.parent, overwrite=True, inputs=[gguf])
    check_output_dir(tmp_path / "models-w8", overwrite=False, inputs=[gguf])  # a sibling is fine
    assert gguf.read_bytes() == b"GGUF"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([".", "..", "a", "b", "x"]), min_size=1, max_size=8))
def test_refused_exactly_when_out_holds_the_current_directory(parts: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp).resolve() / "a" / "b"
        cwd.mkdir(parents=True)
        with contextlib.chdir(cwd):
            out = Path(*parts)
            holds_cwd = cwd == out.resolve() or out.resolve() in cwd.parents
            try:
                check_output_dir(out, overwrite=True)
                refused = False
            except SqueezeError:
                refused = True
        assert refused == holds_cwd, (out, out.resolve() if not refused else None)
        assert cwd.is_dir()
