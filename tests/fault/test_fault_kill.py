"""A real `squeeze quantize` killed at moments spread over its run (SIGTERM and kill -9): the output
is all or nothing, and nothing of the killed run outlives the next run for the same output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from squeeze.models.output import check_output_dir

# seconds after the start: while importing, loading or calibrating, writing, and after the end
MOMENTS = (1.0, 5.0, 8.0)


def _start(model: Path, out: Path, text: Path) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "squeeze.cli", "quantize", str(model), "--out", str(out), "--method", "gptq",
        "--data", str(text), "--eval-tokens", "256", "--seq-len", "32", "--calib-samples", "8", "--generation-prompts", "0",
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _whole(out: Path) -> bool:
    """A finished output: its report and every tensor of its checkpoint readable."""
    if not (out / "report.json").is_file():
        return False
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
    return True


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_a_run_killed_at_any_moment_leaves_all_or_nothing(how: signal.Signals, tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    outcomes = set()
    for moment in MOMENTS:
        out = tmp_path / f"out-{moment}"
        run = _start(tiny_llama_dir, out, small_text)
        time.sleep(moment)
        run.send_signal(how)
        _, stderr = run.communicate(timeout=120)
        written = out.exists()
        outcomes.add(written)
        # all or nothing: an output is whole (the signal may come after it was published, while
        # the process ends), or there is none; a run that exited 0 wrote it
        assert _whole(out) if written else run.returncode != 0, (moment, stderr.decode()[-500:])
        if how == signal.SIGTERM and run.returncode != 0:
            # handled like Ctrl-C once the command runs (at most one line; none while still
            # importing), and the staging folder is gone already
            lines = [line for line in stderr.decode().splitlines() if line.startswith("error:")]
            assert len(lines) <= 1 and "Traceback" not in stderr.decode(), stderr.decode()[-500:]
            assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")] == []
        check_output_dir(out, overwrite=True)  # what the next run does first
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")] == []
    assert False in outcomes  # some moment really interrupted the run before its output
