"""The Typer app, how a command fails (one red line, exit 2) and the options many commands share."""

from __future__ import annotations

import errno
import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from squeeze import __version__
from squeeze.errors import SqueezeError, cli_spelling, in_words
from squeeze.models import meta_model, resolve_model
from squeeze.report import to_rich

app = typer.Typer(
    name="squeeze",
    help="Compress transformer models and report, in numbers, what it cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 2) -> None:
    """Print ``message`` as one red line on stderr and exit with ``code``."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised wherever the program is, so that the cleanup Ctrl-C gets runs
    (the staging folder of the output is removed); ``args[0]`` is the signal's number."""


def _terminate(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise Terminated(signum)


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated`; a signal someone else
    handles or ignores (nohup) is left to them, and only the main thread can take signals."""
    taken = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
                taken[signum] = signal.signal(signum, _terminate)
    try:
        yield
    finally:
        for signum, handler in taken.items():
            signal.signal(signum, handler)


def call(fn, *args, interrupted: str = "interrupted; the output is written whole or not at all", **kwargs):
    """Call the API; user errors and a full disk become one red line naming options as flags
    (``--damp-percent``) and exit 2, Ctrl-C exits 130 and SIGTERM 143 with nothing half-written
    (a signal that comes after the output was published leaves it whole: hence the wording)."""
    try:
        with signals_as_interrupts():
            return fn(*args, **kwargs)
    except SqueezeError as exc:
        fail(in_words(exc, cli_spelling))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        fail(f"no space left on the device writing {exc.filename or 'the output'}; free up space or write elsewhere")
    except Terminated as exc:
        fail(f"{interrupted} ({signal.Signals(exc.args[0]).name})", code=128 + exc.args[0])
    except KeyboardInterrupt:
        fail(interrupted, code=130)


def at_least_one(*options: tuple[str, int]) -> None:
    """One red line for the first count option below 1."""
    for name, value in options:
        if value < 1:
            fail(f"{name} must be at least 1, got {value}")


def not_negative(*options: tuple[str, int]) -> None:
    """One red line for the first count option below 0."""
    for name, value in options:
        if value < 0:
            fail(f"{name} must not be negative, got {value}")


def print_report(report, out_dir: Path, written: str, as_json: bool, quiet: bool) -> None:
    """A pass's report as JSON on stdout, or as tables and the line saying what was written."""
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    elif not quiet:
        out.print(to_rich(report))
        out.print(f"wrote {out_dir}/ ({written})")


def layer_shapes(model: str, trust_remote_code: bool):
    """The model's layers on the meta device (shapes only, no weights read)."""
    return meta_model(resolve_model(model, trust_remote_code=trust_remote_code))


def model_stem(model: str) -> str:
    """The model's name for a default output directory: file stem of a GGUF, last path part otherwise."""
    return Path(model).stem if model.endswith(".gguf") else Path(model.rstrip("/")).name


def _version(value: bool) -> None:
    if value:
        print(f"squeeze {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    """Compress transformer models and report, in numbers, what it cost."""


TrustOption = Annotated[
    bool, typer.Option("--trust-remote-code", help="Let transformers run Python code shipped with the model.")
]
ModelArg = Annotated[str, typer.Argument(help="Built-in name (smollm2, minilm), local HF directory, .gguf file, or hub id.")]
# options every pass takes
DataOption = Annotated[str, typer.Option(help="Evaluation text: wikipedia, bbc, shakespeare, or a .txt file/folder.")]
EvalTokensOption = Annotated[int, typer.Option(help="Evaluation tokens (whole windows of --seq-len).")]
SeqLenOption = Annotated[int, typer.Option(help="Tokens per window.")]
BatchSizeOption = Annotated[int, typer.Option(help="Windows per forward pass.")]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
DtypeOption = Annotated[str, typer.Option(help="Compute dtype for calibration and evaluation: float32, bfloat16 or float16.")]
NoEvalOption = Annotated[bool, typer.Option("--no-eval", help="Skip the accuracy evaluation.")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no table.")]
MemoryBudgetOption = Annotated[Optional[str], typer.Option("--memory-budget", help="Memory the run may use, e.g. 16GB; a run squeeze estimates above it is refused before loading (per process; default: the memory available now less a margin, shared by the processes torchrun started on this machine).")]
StreamOption = Annotated[bool, typer.Option("--stream", help="Hold one transformer block in memory at a time: read it from the safetensors files, compress it, write it, drop it (every method; evaluation and generation agreement included). Chosen by itself when only then the run fits --memory-budget.")]
GenerationPromptsOption = Annotated[int, typer.Option("--generation-prompts", help="Prompts for generation agreement (causal LMs; greedy, 32 tokens each); 0 skips it.")]
MaxShardOption = Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors file written, e.g. 5GB or 500MiB; a bigger checkpoint is split into shards with an index.")]
MeasureSpeedOption = Annotated[bool, typer.Option("--measure-speed", help="Also measure prefill/decode tokens/s and memory of input and output (as squeeze bench-infer; causal LMs).")]
