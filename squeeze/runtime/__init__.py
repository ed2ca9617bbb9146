"""Running compressed models fast, and measuring how fast they run.

- :mod:`~squeeze.runtime.kernels`: quantized layers on PyTorch's integer kernels (``accelerate``);
- :mod:`~squeeze.runtime.measure`: prefill/decode throughput and peak resident memory;
- :mod:`~squeeze.runtime.bench_infer`: ``squeeze bench-infer``, every form of a model measured in
  its own process.
"""

from squeeze.runtime.bench_infer import Form, FormResult, InferBench, bench_infer, default_forms
from squeeze.runtime.kernels import (
    KERNELS,
    Accelerated,
    Int4PackedLinear,
    Int8DynamicLinear,
    Int8WeightLinear,
    accelerate,
)
from squeeze.runtime.measure import RssSampler, measure_speed

__all__ = [
    "KERNELS",
    "Accelerated",
    "Form",
    "FormResult",
    "InferBench",
    "Int4PackedLinear",
    "Int8DynamicLinear",
    "Int8WeightLinear",
    "RssSampler",
    "accelerate",
    "bench_infer",
    "default_forms",
    "measure_speed",
]
