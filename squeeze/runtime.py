"""Run quantized checkpoints with integer kernels, and measure how fast they run.

``squeeze quantize`` evaluates :class:`~squeeze.quant.linear.QuantizedLinear`, which dequantizes
its weight on every call: exact, but no faster than the dense model. Here the same codes and
scales run on kernels PyTorch ships for CPU (and CUDA):

- **W8A8** (int8 weights per channel, int8 activations per token, symmetric): each call
  quantizes its input rows with the scheme's own rounding, multiplies int8 × int8 into int32
  (``torch._int_mm``) and rescales by the row and channel scales. This is the checkpoint's
  arithmetic, not an approximation of it: only the order of float roundings differs.
- **W4A16** (int4 weights per group of 32/64/128/256): the weight is packed once for
  ``_weight_int4pack_mm`` and activations run in bfloat16 ("A16").
- **W8A16** (int8 weights per channel): ``_weight_int8pack_mm`` for short inputs, the same
  dequantize-then-matmul for long ones.

Other schemes (asymmetric activations, static activation scales, per-tensor weights, ...) keep the
reference forward. :func:`accelerate` says which layers moved to which kernel.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4
    from transformers.modeling_utils import no_init_weights
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.models import read_safetensors_folder
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.pack import unpack_int32
from squeeze.quant.rtn import compute_qparams
from squeeze.quant.scheme import QuantArgs, QuantScheme

SHORT_INPUT_ROWS = 16  # at most this many rows per call (decoding) use the weight-only kernels
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm takes


# ---------------------------------------------------------------------------------------------
# reading compressed-tensors checkpoints


def quantization_scheme(folder: Path) -> QuantScheme | None:
    """The scheme of a compressed-tensors checkpoint with one integer config group; None when the
    folder's config has no compressed-tensors quantization (a dense or sparse-only model)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors" or not qc.get("config_groups"):
        return None
    groups = list(qc["config_groups"].values())
    if len(groups) != 1:
        raise SqueezeError(f"{folder}: {len(groups)} quantization config groups; squeeze runs checkpoints with one")
    group = groups[0]

    def args(entry: dict | None) -> QuantArgs | None:
        if entry is None:
            return None
        if entry.get("type", "int") != "int":
            raise SqueezeError(f"{folder}: {entry.get('type')} quantization is not supported; squeeze runs int schemes")
        return QuantArgs(
            num_bits=entry["num_bits"], symmetric=entry["symmetric"], strategy=entry["strategy"],
            group_size=entry.get("group_size") if entry["strategy"] == "group" else None,
            dynamic=bool(entry.get("dynamic")), scale_dtype=entry.get("scale_dtype"),
        )

    return QuantScheme(weights=args(group["weights"]), input_activations=args(group.get("input_activations")))


def _quantized_layer(name: str, linear: nn.Linear, state: dict[str, torch.Tensor], scheme: QuantScheme) -> QuantizedLinear:
    """Rebuild one layer's QuantizedLinear from its checkpoint tensors (taken out of ``state``)."""
    args = scheme.weights
    scale = state.pop(f"{name}.weight_scale")
    if f"{name}.weight_packed" in state:
        codes = unpack_int32(state.pop(f"{name}.weight_packed"), args.num_bits, linear.in_features)
        state.pop(f"{name}.weight_shape", None)
        zero = state.pop(f"{name}.weight_zero_point", None)
        if zero is not None and args.strategy in ("channel", "group"):
            zero = unpack_int32(zero, args.num_bits, linear.out_features, dim=0)
    else:
        codes = state.pop(f"{name}.weight")
        zero = state.pop(f"{name}.weight_zero_point", None)
    if zero is None:
        zero = torch.zeros(scale.shape, dtype=torch.int8)
    bias = state.pop(f"{name}.bias", None)
    input_scale = state.pop(f"{name}.input_scale", None)
    input_zero = state.pop(f"{name}.input_zero_point", None)
    if input_scale is not None and input_zero is None:
        input_zero = torch.zeros_like(input_scale, dtype=torch.int8)
    return QuantizedLinear(
        scheme, codes, scale, zero, bias, input_scale, input_zero, compute_dtype=linear.weight.dtype,
    )


def load_quantized(folder: Path, kind: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """A compressed-tensors checkpoint as squeeze evaluates it: every quantized Linear becomes a
    QuantizedLinear holding the stored codes and scales; everything else is loaded as stored.

    A Linear counts as quantized when the checkpoint holds its ``weight_scale``.
    """
    folder = Path(folder)
    scheme = quantization_scheme(folder)
    if scheme is None:
        raise SqueezeError(f"{folder} is not a compressed-tensors quantized checkpoint")
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    auto = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel
    state = read_safetensors_folder(folder)
    with no_init_weights():  # every tensor is overwritten from the checkpoint
        model = auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.weight_scale" in state:
            layer = _quantized_layer(name, module, state, scheme)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    distinct = {n for n, _ in model.named_parameters()}
    missing = [k for k in missing if k in distinct and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise SqueezeError(
            f"quantized checkpoint {folder} does not match its config: "
            + (f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}")
        )
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# kernels


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class Int8DynamicLinear(nn.Module):
    """W8A8: int8 × int8 → int32 (``torch._int_mm``), inputs quantized per token at run time."""

    kernel = "int8 x int8 (_int_mm), per-token int8 activations"

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.act = layer.scheme.input_activations
        self.register_buffer("weight_t", layer.weight_codes.t().contiguous())  # [in, out] int8
        self.register_buffer("weight_scale", layer.weight_scale.float().reshape(1, -1))
        self.bias = layer.bias

    @staticmethod
    def supports(layer: QuantizedLinear) -> bool:
        w, a = layer.scheme.weights, layer.scheme.input_activations
        return (
            a is not None and a.dynamic and a.strategy == "token" and a.symmetric and a.num_bits == 8
            and w.num_bits == 8 and w.symmetric and w.strategy == "channel"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x).float()
        act = self.act
        if act.scale_dtype is None:
            # what compute_qparams gives for symmetric per-token scales, in fewer passes over x
            scale = rows.abs().amax(dim=-1, keepdim=True) / ((act.qmax - act.qmin) / 2)
            scale = scale.masked_fill_(scale == 0, torch.finfo(scale.dtype).eps)
        else:
            scale, _ = compute_qparams(rows, act)
        codes = (rows / scale).round_().clamp_(act.qmin, act.qmax).to(torch.int8)
        n = codes.shape[0]
        if codes.is_cuda and n <= 16:  # CUDA's _int_mm takes more than 16 rows: pad with zero rows
            codes = F.pad(codes, (0, 0, 0, 17 - n))
        out = torch._int_mm(codes, self.weight_t)[:n].float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out = out.add_(self.bias.float())
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int4PackedLinear(nn.Module):
    """W4A16: int4 codes packed once for ``_weight_int4pack_mm``, bfloat16 activations. Only the
    packed codes are kept (half a byte per weight), so long inputs use the kernel too."""

    kernel = "int4 weight pack (_weight_int4pack_mm), bfloat16 activations"

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.group_size = layer.scheme.weights.group_size
        self.bias = layer.bias
        codes = layer.weight_codes.to(torch.int32) + 8  # the kernel's unsigned 0..15
        scale = layer.weight_scale.float()
        zero = layer.weight_zero_point.float()
        # the kernel computes (q - 8) · scale + offset; ours is (c - z) · scale with c = q - 8
        scales_and_zeros = torch.stack([scale.t(), (-zero * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [groups, out, 2]
        if codes.is_cuda:
            packed = torch.ops.aten._convert_weight_to_int4pack(((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8), 8)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.register_buffer("packed", packed)

    @staticmethod
    def supports(layer: QuantizedLinear) -> bool:
        w = layer.scheme.weights
        return (
            layer.scheme.input_activations is None and w.num_bits == 4 and w.strategy == "group"
            and w.group_size in INT4_GROUP_SIZES and layer.in_features % w.group_size == 0
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x).to(torch.bfloat16)
        if rows.is_cuda:
            out = torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.group_size, self.scales_and_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int8WeightLinear(nn.Module):
    """W8A16: int8 codes with per-channel scales, bfloat16 activations: ``_weight_int8pack_mm``
    for short inputs (decoding); long ones (prefill) dequantize the weight per call, which is
    faster there."""

    kernel = "int8 weight (_weight_int8pack_mm), bfloat16 activations"

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bias = layer.bias
        self.register_buffer("codes", layer.weight_codes.contiguous())
        self.register_buffer("row_scale", layer.weight_scale.reshape(-1).to(torch.bfloat16))

    @staticmethod
    def supports(layer: QuantizedLinear) -> bool:
        w = layer.scheme.weights
        return layer.scheme.input_activations is None and w.num_bits == 8 and w.symmetric and w.strategy == "channel"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x).to(torch.bfloat16)
        if rows.shape[0] <= SHORT_INPUT_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.codes, self.row_scale)
        else:
            out = F.linear(rows, self.codes.to(torch.bfloat16) * self.row_scale[:, None])
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


KERNELS: tuple[type, ...] = (Int8DynamicLinear, Int4PackedLinear, Int8WeightLinear)


@dataclass(frozen=True)
class Accelerated:
    """What :func:`accelerate` did: layers per kernel, and the dtype the rest of the model runs in."""

    kernels: dict[str, int]
    reference_layers: int  # quantized layers left on the dequantize-per-call forward
    compute_dtype: torch.dtype

    def describe(self) -> str:
        parts = [f"{n} layers on {k}" for k, n in self.kernels.items()]
        if self.reference_layers:
            parts.append(f"{self.reference_layers} on the reference (dequantize) forward")
        return "; ".join(parts) or "no quantized layers"


def accelerate(model: nn.Module) -> Accelerated:
    """Swap each QuantizedLinear for the kernel its scheme allows, in place. Weight-only (A16)
    models then run in bfloat16 as a whole, the activations their kernels take."""
    used: Counter[str] = Counter()
    reference = 0
    weight_only = False
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantizedLinear):
            continue
        kernel = next((k for k in KERNELS if k.supports(module)), None)
        if kernel is None:
            reference += 1
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, kernel(module))
        used[kernel.kernel] += 1
        weight_only |= kernel is not Int8DynamicLinear
    compute_dtype = next(model.parameters()).dtype
    if weight_only and not reference:
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)
        compute_dtype = torch.bfloat16
    if isinstance(model, transformers.PreTrainedModel):
        model.config.dtype = compute_dtype
    return Accelerated(dict(used), reference, compute_dtype)


# ---------------------------------------------------------------------------------------------
# speed


class RssSampler:
    """Highest resident set size seen by a background thread (every 5 ms), in bytes."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_speed(model: nn.Module, prompt: torch.Tensor, decode_tokens: int = 128, repeats: int = 3) -> tuple[float, float]:
    """Best-of-``repeats`` prefill and decode throughput (tokens/s) of a causal LM with its KV cache.

    Prefill: one forward over ``prompt`` [1, n] computing only the last position's logits (what
    generation needs). Decode: ``decode_tokens`` greedy steps after it, one token per forward.
    """
    device = prompt.device
    prefill_best = decode_best = 0.0
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        _sync(device)
        prefill = time.perf_counter() - start
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True, logits_to_keep=1)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode = time.perf_counter() - start
        prefill_best = max(prefill_best, prompt.shape[1] / prefill)
        decode_best = max(decode_best, decode_tokens / decode)
    return prefill_best, decode_best

