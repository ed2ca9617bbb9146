"""Started by tests/calib/test_parallel.py under ``torchrun --nproc-per-node 2``.

``statistics OUT``: the statistics of a toy block measured under data-parallel calibration
(process 0 saves them to OUT). ``passes MODEL TEXT OUT``: every calibrated method of
:data:`PASSES` through the command line, in a process group this script started itself (squeeze
must use it and leave it up). ``fail MODEL TEXT OUT``: GPTQ whose process 1 fails in the middle
of the second block.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from squeeze.calib.observers import observe_hessians
from squeeze.calib.parallel import data_parallel, reduce_sum, share
from squeeze.cli import app
from squeeze.errors import SqueezeError
from squeeze.processes import Processes
from squeeze.prune.wanda import InputNormAccumulator
from squeeze.quant.awq import capture_inputs

COMMON = ["--seq-len", "32", "--calib-samples", "8", "--batch-size", "2", "--eval-tokens", "512", "--json", "-q"]
PASSES = {
    "gptq": ["quantize", "--method", "gptq", "--bits", "4", "--mode", "per-group", "--group-size", "32"],
    "awq": ["quantize", "--method", "awq", "--group-size", "32"],
    "smoothquant": ["quantize", "--method", "smoothquant", "--act", "per-tensor"],
    "hqq": ["quantize", "--method", "hqq", "--group-size", "32"],
    "gptq-streamed": ["quantize", "--method", "gptq", "--bits", "4", "--mode", "per-group", "--group-size", "32", "--stream", "--max-shard-size", "100KB"],
    "wanda": ["prune", "--method", "wanda", "--sparsity", "0.5"],
    "sparsegpt": ["prune", "--method", "sparsegpt", "--sparsity", "0.5"],
}


class ToyBlock(nn.Module):
    """q and k read the same input; o reads q's output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.o = nn.Linear(16, 24), nn.Linear(16, 8), nn.Linear(24, 16)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.o(self.q(hidden) + self.k(hidden).repeat(1, 1, 3)) + hidden


def toy_inputs() -> list:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 5 + (i == 6), 16, generator=generator) * (1 + i), {}) for i in range(7)]


def statistics(block: ToyBlock, inputs: list) -> dict[str, torch.Tensor]:
    """What every calibrated method measures of ``block`` on this process's share of ``inputs``."""
    modules = {"q": block.q, "k": block.k, "o": block.o}
    mine = share(inputs)
    hessians = observe_hessians(block, mine, modules, static=True)
    norms = InputNormAccumulator(16)
    for hidden, _ in mine:
        norms.add(hidden)
    reduce_sum(norms.squared)
    rows = capture_inputs(block, mine, modules, max_rows=40)
    out = {f"hessian.{n}": hessians.accumulators[n].hessian for n in ("q", "o")}
    out.update({f"range.{n}": torch.stack(hessians.ranges[n]) for n in modules})
    out.update({"norms": norms.squared, **{f"rows.{n}": rows[n] for n in ("q", "k", "o")}})
    return out


def main() -> None:
    job, *args = sys.argv[1:]
    if job == "fail":
        return fail(*args)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if job == "statistics":
        with data_parallel(Processes(rank, dist.get_world_size())):
            measured = statistics(ToyBlock(), toy_inputs())
        if rank == 0:
            save_file({k: v.clone() for k, v in measured.items()}, args[0])
    else:
        model, text, out = args
        results = {}
        for name, command in PASSES.items():
            result = CliRunner().invoke(app, [*command, model, "--data", text, "--out", f"{out}/{name}", *COMMON])
            results[name] = [result.exit_code, result.output[-2000:]]
        refused = CliRunner().invoke(app, ["quantize", model, "--method", "autoround", "--data", text, "--out", f"{out}/ar", *COMMON])
        results["autoround"] = [refused.exit_code, refused.output[-2000:]]
        results["group_still_up"] = dist.is_initialized()
        if rank == 0:
            Path(out, "results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def fail(model: str, text: str, out: str) -> None:
    """The squeeze command line, with process 1's GPTQ failing on the second block's first solve."""
    import squeeze.quant.methods.gptq as gptq

    solve, calls = gptq.gptq_quantize, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5 and dist.get_rank() == 1:
            raise SqueezeError("injected failure in the second block")
        return solve(*args, **kwargs)

    gptq.gptq_quantize = failing
    sys.argv = ["squeeze", *PASSES["gptq"], model, "--data", text, "--out", out, *COMMON]
    app()


if __name__ == "__main__":
    main()
