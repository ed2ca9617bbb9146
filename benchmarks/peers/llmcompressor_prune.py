"""llm-compressor's one-shot pruning (magnitude, Wanda, SparseGPT), alone and before int4 weights, on SmolLM2.

    benchmarks/peers/.venv/bin/python benchmarks/peers/llmcompressor_prune.py CONFIG \
        --calib-samples N --seq-len 512 --eval-tokens T --out DIR --result JSON

Runs in the peers venv (benchmarks/peers/setup.sh), one configuration per process so that peak RSS
is that configuration's own, exactly as ``llmcompressor_calibrated.py`` does: the same fp32 weights
squeeze uses, squeeze's own calibration token rows handed to ``oneshot`` (timed; no shuffling, no
re-tokenizing), the model scored as oneshot leaves it in memory against an fp32 copy with squeeze's
``compare_causal`` on squeeze's evaluation windows of two texts, then saved with
``save_compressed=True`` and measured. Only the decoder blocks' Linear layers are pruned (lm_head,
tied to the embeddings, is kept). Writes one JSON object to ``--result``.

The sparsity is measured here, not taken from llm-compressor's logs: the fraction of exact zeros in
the weights the model computes with (for quantized layers, the weight after compressed-tensors'
own fake-quantization, which is what the forward pass uses), over all targeted layers and per layer.
For prune-then-quantize configurations the positions Wanda zeroed are recorded as it prunes, and
``sparsity_kept`` is the fraction of them still exactly zero after quantization.

Magnitude pruning: in llm-compressor 0.14 ``MagnitudePruningModifier`` only computes masks; it
multiplies them into the weights on optimizer-step events of the training lifecycle, which
``oneshot`` never sends, and removes them when it finalizes. So this script first runs it through
``oneshot`` as documented (start 0, end 1), measures that nothing was pruned, and then drives the
same modifier through llm-compressor's own training lifecycle for one step with no optimizer
(session initialize, batch start, optimizer pre/post step, batch end, finalize), which is what
applies its masks. Both are recorded. Its mask factory has no N:M structure, so ``magnitude-2:4``
fails inside llm-compressor; the script records the error and exits non-zero.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time

import torch
from safetensors import safe_open

from llmcompressor_calibrated import calibration_dataset, int4_weights
from peer_common import IGNORE, MODEL, calibration_rows, evaluate, evaluation_sets, parse_args, quantized_linears, size_fields, write_result
from squeeze.models import load_model

CONFIGS = [
    "magnitude-50",
    "wanda-50",
    "sparsegpt-50",
    "magnitude-2:4",
    "wanda-2:4",
    "sparsegpt-2:4",
    "wanda-2:4+gptq-w4-g64",
    "wanda-2:4+rtn-w4-g64",
]

SPARSITY = 0.5
# The decoder blocks, as llm-compressor's 2:4 examples target them; Wanda and SparseGPT prune the
# Linear layers inside each. lm_head is outside them (and in IGNORE as well).
DECODER_LAYERS = [r"re:model\.layers\.\d+$"]


def parse_config(config: str) -> tuple[str, str, str | None]:
    """(pruning method, mask structure as llm-compressor spells it, quantization config or None)."""
    pruning, _, quantization = config.partition("+")
    method, _, structure = pruning.partition("-")
    if structure == "2:4":
        return method, "2:4", quantization or None
    # Unstructured: Wanda and SparseGPT spell it "0:0", the magnitude modifier "unstructured".
    return method, "unstructured" if method == "magnitude" else "0:0", quantization or None


def magnitude_modifier(names: list[str], structure: str):
    """MagnitudePruningModifier at a constant 50%, per layer, on exactly the targeted Linear layers.

    It has no ``ignore``, and its targets also pick up any module with a ``weight`` (norms), so the
    targets are the Linear layers' own names. init = final sparsity with start 0 / end 1 is the
    one-step schedule: the mask computed at start is already the final one.
    """
    from llmcompressor.modifiers.pruning import MagnitudePruningModifier

    return MagnitudePruningModifier(
        targets=names, init_sparsity=SPARSITY, final_sparsity=SPARSITY, mask_structure=structure, start=0, end=1
    )


def recipe(method: str, structure: str, quantization: str | None) -> tuple[list, dict]:
    """(the modifiers oneshot runs for a Wanda or SparseGPT configuration, the arguments that define them)."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    common = dict(sparsity=SPARSITY, mask_structure=structure, targets=DECODER_LAYERS, ignore=IGNORE)
    if method == "wanda":
        pruner = WandaPruningModifier(**common)
        arguments = {"pruner": "WandaPruningModifier", **common}
    elif method == "sparsegpt":
        pruner = SparseGPTModifier(**common)  # its defaults otherwise
        arguments = {
            "pruner": "SparseGPTModifier",
            **common,
            "block_size": pruner.block_size,
            "dampening_frac": pruner.dampening_frac,
            "preserve_sparsity_mask": pruner.preserve_sparsity_mask,
        }
    else:
        raise ValueError(method)
    modifiers = [pruner]
    if quantization is None:
        return modifiers, arguments
    groups = int4_weights(quantization)  # the calibrated script's int4 config_groups
    arguments["quantization"] = {"config_groups": groups, "ignore": IGNORE}
    if quantization.startswith("gptq-"):
        gptq = GPTQModifier(ignore=IGNORE, config_groups=groups)  # its defaults otherwise
        arguments["quantization"] |= {
            "modifier": "GPTQModifier",
            "block_size": gptq.block_size,
            "dampening_frac": gptq.dampening_frac,
            "actorder": str(gptq.actorder),
        }
        modifiers.append(gptq)
    else:
        arguments["quantization"] |= {"modifier": "QuantizationModifier"}
        modifiers.append(QuantizationModifier(ignore=IGNORE, config_groups=groups))
    return modifiers, arguments


@contextlib.contextmanager
def recording_pruned_positions(pruner_class, masks: dict[str, torch.Tensor]):
    """Record, per layer, the positions ``pruner_class`` zeroes, right after it writes each weight.

    Wraps the class's ``compress_modules`` (called once per decoder block) without changing what it
    does; measurement only. Needed because a quantizer that runs after it in the same recipe may
    overwrite the zeros before oneshot returns.
    """
    original = pruner_class.compress_modules

    def compress_and_record(self):
        pending = [(module, self._module_names[module]) for module in self._num_samples]
        original(self)
        for module, name in pending:
            masks[name] = module.weight.detach() == 0

    pruner_class.compress_modules = compress_and_record
    try:
        yield masks
    finally:
        pruner_class.compress_modules = original


def prune_by_training_lifecycle(model: torch.nn.Module, modifier) -> None:
    """Apply a MagnitudePruningModifier through llm-compressor's training lifecycle for one step.

    initialize (start 0: the modifier computes its masks and enables them), then one step's events
    with no optimizer; OPTIM_POST_STEP is where it multiplies its masks into the weights; finalize
    removes the mask buffers and leaves the pruned weights.
    """
    from llmcompressor.core import LifecycleCallbacks, active_session

    session = active_session()
    session.reset()
    session.initialize(model=model, recipe=[modifier], start=0)
    LifecycleCallbacks.batch_start(global_step=0)
    LifecycleCallbacks.optim_pre_step()
    LifecycleCallbacks.optim_post_step()
    LifecycleCallbacks.batch_end()
    session.finalize()


@torch.no_grad()
def computed_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight the module's forward multiplies by: fake-quantized the way compressed-tensors' wrapper does."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    weight = module.weight.detach()
    scheme = getattr(module, "quantization_scheme", None)
    status = getattr(module, "quantization_status", None)
    if getattr(module, "quantization_enabled", True) and scheme is not None and status is not None:
        if scheme.weights is not None and status < QuantizationStatus.COMPRESSED:
            return forward_quantize(module, weight, "weight", scheme.weights)
    return weight


@torch.no_grad()
def sparsity_fields(model: torch.nn.Module, names: list[str], structure: str, pruned: dict[str, torch.Tensor] | None) -> dict:
    """Exact zeros in the targeted layers' computed weights; with ``pruned`` masks, how many of those positions stayed zero."""
    modules = dict(model.named_modules())
    per_layer, zeros, total = {}, 0, 0
    stored_zeros, kept, was_pruned = 0, 0, 0
    groups_ok, groups = 0, 0
    for name in names:
        module = modules[name]
        zero = computed_weight(module) == 0
        per_layer[name] = zero.float().mean().item()
        zeros += int(zero.sum())
        total += zero.numel()
        stored_zeros += int((module.weight.detach() == 0).sum())
        if structure == "2:4":
            per_group = zero.reshape(zero.shape[0], -1, 4).sum(-1)
            groups_ok += int((per_group >= 2).sum())
            groups += per_group.numel()
        if pruned is not None and name in pruned:
            kept += int((zero & pruned[name]).sum())
            was_pruned += int(pruned[name].sum())
    low = min(per_layer, key=per_layer.get)
    high = max(per_layer, key=per_layer.get)
    fields = {
        "sparsity_target": SPARSITY,
        "sparsity_achieved": zeros / total,
        "sparsity_min_layer": per_layer[low],
        "sparsity_min_layer_name": low,
        "sparsity_max_layer": per_layer[high],
        "sparsity_max_layer_name": high,
        "sparsity_layers": len(per_layer),
        "sparsity_stored_weights": stored_zeros / total,
    }
    if structure == "2:4":
        fields["two_of_four_groups_ok"] = groups_ok / groups  # groups of 4 inputs with at least 2 zeros
    if pruned is not None:
        fields |= {
            "sparsity_before_quantization": was_pruned / total,
            "pruned_layers_recorded": len(pruned),
            "sparsity_kept": kept / was_pruned if was_pruned else None,
        }
    return fields


@torch.no_grad()
def untargeted_changes(model: torch.nn.Module, reference: torch.nn.Module, names: list[str]) -> list[str]:
    """Reference tensors other than the targeted weights whose values differ after compression (expect none)."""
    targeted = {f"{n}.weight" for n in names}
    state = model.state_dict()
    return [
        key
        for key, value in reference.state_dict().items()
        if key not in targeted and key in state and state[key].shape == value.shape and not torch.equal(state[key], value)
    ]


@torch.no_grad()
def same_weights(model: torch.nn.Module, reference: torch.nn.Module, names: list[str]) -> bool:
    modules, originals = dict(model.named_modules()), dict(reference.named_modules())
    return all(torch.equal(modules[n].weight, originals[n].weight) for n in names)


def checkpoint_format(folder, names: list[str]) -> dict:
    """What llm-compressor wrote: config.json's quantization / sparsity config and the targeted layers' tensors."""
    config = json.loads((folder / "config.json").read_text())
    quantization = config.get("quantization_config") or {}
    sparsity = quantization.get("sparsity_config") or config.get("sparsity_config")
    if isinstance(sparsity, dict):
        sparsity = {k: (len(v) if isinstance(v, list) else v) for k, v in sparsity.items()}  # target lists as counts
    groups = quantization.get("config_groups") or {}
    tensors, float_zeros, float_total = {}, 0, 0
    targeted = set(names)
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                layer, _, kind = key.rpartition(".")
                if layer not in targeted:
                    continue
                t = f.get_tensor(key)
                tensors.setdefault(kind, str(t.dtype).removeprefix("torch."))
                if kind == "weight" and t.is_floating_point():
                    float_zeros += int((t == 0).sum())
                    float_total += t.numel()
    return {
        "quantization_config_present": bool(quantization),
        "quant_method": quantization.get("quant_method"),
        "format": quantization.get("format"),
        "quantization_status": quantization.get("quantization_status"),
        "weights": {k: (v.get("weights") or {}) for k, v in groups.items()} or None,
        "sparsity_config": sparsity,
        "targeted_layer_tensors": tensors,  # tensor name suffix -> dtype, as stored for the targeted layers
        # zeros in dense stored weights: whether the pruning reached the file (None when weights are packed)
        "stored_dense_weight_zero_fraction": float_zeros / float_total if float_total else None,
    }


def describe(method: str, structure: str, quantization: str | None, arguments: dict, calibration_tokens: int, lifecycle: bool, layers: int) -> str:
    """One sentence saying exactly what ran."""
    shape = "2:4" if structure == "2:4" else "unstructured 50% per layer"
    if method == "magnitude":
        what = f"MagnitudePruningModifier({shape}, init=final sparsity 0.5, start 0, end 1) on the {layers} decoder-block Linear layers by name"
        if lifecycle:
            what = (
                f"oneshot({what}) (which left the weights unchanged), then the same modifier through llm-compressor's "
                "training lifecycle for one step with no optimizer (initialize, batch_start, optim_pre_step, "
                "optim_post_step, batch_end, finalize), which is what applies its masks"
            )
        else:
            what = f"oneshot({what})"
        return (
            f"llm-compressor {what}, no calibration data, lm_head kept, scored in memory by squeeze's compare_causal "
            "against an fp32 copy, then saved with save_compressed=True; quantize_s is the pruning call that pruned."
        )
    pruner = f"{arguments['pruner']}(sparsity 0.5, mask_structure {structure}, targets decoder layers, ignore lm_head"
    if method == "sparsegpt":
        pruner += f", block_size {arguments['block_size']}, dampening_frac {arguments['dampening_frac']}"
    pruner += ")"
    if quantization:
        weights = next(iter(arguments["quantization"]["config_groups"].values()))["weights"]
        scheme = f"int{weights['num_bits']} symmetric group-{weights['group_size']} weights"
        q = arguments["quantization"]
        if q["modifier"] == "GPTQModifier":
            pruner += f", GPTQModifier({scheme}, block_size {q['block_size']}, dampening_frac {q['dampening_frac']}, actorder {q['actorder']})"
        else:
            pruner += f", QuantizationModifier({scheme}, min-max observer)"
        pruner = f"[{pruner}]"
    return (
        f"llm-compressor oneshot({pruner}) on {calibration_tokens} calibration tokens (squeeze's rows, unshuffled), "
        "lm_head kept, scored in memory (fake-quant where quantized) by squeeze's compare_causal against an fp32 copy, "
        "then saved with save_compressed=True; quantize_s is the oneshot call."
    )


def main() -> None:
    args = parse_args(__doc__, CONFIGS)
    method, structure, quantization = parse_config(args.config)

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    import squeeze

    print(f"squeeze imported from {squeeze.__file__}", flush=True)

    loaded = load_model(MODEL)  # squeeze's loader: same fp32 weights and tokenizer as squeeze's runs
    model, tokenizer = loaded.model, loaded.tokenizer
    sets = evaluation_sets(tokenizer, args)
    reference = copy.deepcopy(model)
    names, parameters, linear_before = quantized_linears(model)
    # exact zeros the fp32 weights already have (SmolLM2 here is dequantized from a Q4_1 GGUF)
    original_sparsity = sparsity_fields(reference, names, "0:0", None)["sparsity_achieved"]
    notes: list[str] = []
    timings: dict[str, float] = {}
    calibration_tokens, pruned_positions, lifecycle = 0, None, False
    extra: dict = {}

    if method == "magnitude":
        arguments = {
            "pruner": "MagnitudePruningModifier",
            "targets": f"the {len(names)} decoder-block Linear layers, by name",
            "init_sparsity": SPARSITY,
            "final_sparsity": SPARSITY,
            "mask_structure": structure,
            "start": 0,
            "end": 1,
        }
        start = time.perf_counter()
        try:
            model = oneshot(model=model, tokenizer=tokenizer, recipe=[magnitude_modifier(names, structure)])
        except ValueError as error:
            message = (
                f"llm-compressor {llmcompressor.__version__} MagnitudePruningModifier rejects mask_structure "
                f"{structure!r}: {error}. Its mask factory knows 'unstructured', 'channel', 'filter' and "
                "'block_*' only; N:M is implemented by WandaPruningModifier and SparseGPTModifier alone."
            )
            write_result(args.result, {"error": message, "arguments": arguments, "llmcompressor_version": llmcompressor.__version__})
            raise SystemExit(message) from error
        timings["oneshot"] = time.perf_counter() - start
        after_oneshot = sparsity_fields(model, names, structure, None)["sparsity_achieved"]
        unchanged = same_weights(model, reference, names)
        extra |= {"oneshot_sparsity_achieved": after_oneshot, "oneshot_left_weights_unchanged": unchanged}
        if after_oneshot < 0.9 * SPARSITY:
            lifecycle = True
            notes.append(
                f"oneshot(MagnitudePruningModifier(start 0, end 1)) ran without error but did not prune: measured "
                f"sparsity {after_oneshot:.4f} (the original weights have {original_sparsity:.4f} exact zeros), "
                f"targeted weights bit-identical to the original: {unchanged}. In 0.14 the "
                "modifier computes masks at start and multiplies them into the weights only on OPTIM_POST_STEP "
                "events (or in forward hooks when initialized with use_hooks, which oneshot cannot pass), and "
                "oneshot sends no optimizer events; without start it never even computes them."
            )
            notes.append(
                "To make it prune, the same modifier was driven through llm-compressor's training lifecycle "
                "(active_session().initialize(model, recipe, start=0); LifecycleCallbacks.batch_start, "
                "optim_pre_step, optim_post_step, batch_end; session.finalize()) for one step with no optimizer "
                "and no data: this is its own mask code applying its own masks, nothing else changes the weights."
            )
            start = time.perf_counter()
            prune_by_training_lifecycle(model, magnitude_modifier(names, structure))
            timings["training_lifecycle_step"] = time.perf_counter() - start
        quantize_s = timings.get("training_lifecycle_step", timings["oneshot"])
    else:
        modifiers, arguments = recipe(method, structure, quantization)
        rows = calibration_rows(tokenizer, args)
        calibration_tokens = int(rows.numel())
        data = dict(
            dataset=calibration_dataset(rows),
            num_calibration_samples=rows.shape[0],
            max_seq_length=args.seq_len,
            shuffle_calibration_samples=False,
        )
        recorder = contextlib.nullcontext()
        if quantization is not None:
            pruned_positions = {}
            recorder = recording_pruned_positions(WandaPruningModifier, pruned_positions)
        with recorder:
            start = time.perf_counter()
            model = oneshot(model=model, tokenizer=tokenizer, recipe=modifiers, **data)
            quantize_s = timings["oneshot"] = time.perf_counter() - start
        if pruned_positions is not None:
            notes.append(
                "Wanda's zeroed positions were recorded right after it wrote each layer (its compress_modules "
                "wrapped, behaviour unchanged); sparsity_kept is the fraction of them still exactly zero in the "
                "weights the quantized model computes with (compressed-tensors' fake-quantized weight), after oneshot."
            )

    measured = sparsity_fields(model, names, structure, pruned_positions)
    del pruned_positions
    changed = untargeted_changes(model, reference, names)
    if changed:
        notes.append(f"tensors outside the targeted weights changed: {changed[:10]}")

    scores, evaluate_s = evaluate(model, reference, sets)
    del reference
    timings["evaluate"] = evaluate_s

    start = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    timings["save"] = time.perf_counter() - start
    written = checkpoint_format(args.out, names)
    if written["sparsity_config"] is None:
        notes.append(
            "llm-compressor wrote no sparsity_config: compressed-tensors "
            "0.19 has no sparse compressors (sparse-bitmask / sparse-24-bitmask / marlin-24 are listed as legacy "
            "formats), so the zeros are stored as ordinary values in the weight tensors and save no bytes."
        )
    disk_bytes = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))

    write_result(
        args.result,
        {
            "method": method,
            "mask_structure": structure,
            "quantization": quantization,
            **measured,
            "sparsity_original": original_sparsity,
            **extra,
            "untargeted_tensors_changed": len(changed),
            "eval": scores,
            **size_fields(args.out, names, parameters, linear_before),
            "disk_bytes": disk_bytes,
            "checkpoint_format": written,
            "calibration_tokens": calibration_tokens,
            "quantize_s": quantize_s,
            "timings_s": timings,
            "arguments": arguments,
            "llmcompressor_version": llmcompressor.__version__,
            "how": describe(method, structure, quantization, arguments, calibration_tokens, lifecycle, len(names)),
            "notes": notes,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
