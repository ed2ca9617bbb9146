"""squeeze's public verbs, in one place: what the CLI calls, and what Python users import.

Each verb validates everything cheap first (output folder, device, model header, options against
the model's shapes, text sources), then does the long work, and publishes its output folder only
when everything succeeded. The bodies live where their work is:

- :func:`quantize`, :func:`prune`: squeeze.passes (one skeleton: prepare → compress → evaluate →
  write → report; the methods in squeeze.quant.methods and squeeze.prune.methods, the checkpoint
  formats in squeeze.formats);
- :func:`distill`: squeeze.passes.distill (trains instead of compressing, same evaluation and
  publishing);
- :func:`run_recipe`, :func:`plan_run`: squeeze.chain (stages of a recipe, each scored against the
  original);
- :func:`evaluate_model`, :func:`generate_side_by_side`: squeeze.passes.evaluate and .generate.
"""

from __future__ import annotations

from squeeze.chain import STAGE_FILE, plan_run, run_recipe
from squeeze.device import COMPUTE_DTYPES, resolve_device, resolve_dtype
from squeeze.passes.common import GENERATION_PROMPT_TOKENS, GENERATION_PROMPTS, GENERATION_TOKENS
from squeeze.passes.distill import PERIODIC_EVAL_WINDOWS, distill
from squeeze.passes.evaluate import EvalResult, evaluate_model
from squeeze.passes.generate import generate_side_by_side, read_prompts
from squeeze.passes.prune import prune
from squeeze.passes.quantize import quantize

__all__ = [
    "COMPUTE_DTYPES",
    "EvalResult",
    "GENERATION_PROMPTS",
    "GENERATION_PROMPT_TOKENS",
    "GENERATION_TOKENS",
    "PERIODIC_EVAL_WINDOWS",
    "STAGE_FILE",
    "distill",
    "evaluate_model",
    "generate_side_by_side",
    "plan_run",
    "prune",
    "quantize",
    "read_prompts",
    "resolve_device",
    "resolve_dtype",
    "run_recipe",
]
