"""The quantization methods by name: one file each in this package, one entry each here."""

from __future__ import annotations

from squeeze.options import MethodRegistry
from squeeze.quant.methods.awq import AWQ
from squeeze.quant.methods.base import QuantMethod
from squeeze.quant.methods.gptq import GPTQ
from squeeze.quant.methods.rtn import RTN
from squeeze.quant.methods.smoothquant import SmoothQuant

METHODS: MethodRegistry[QuantMethod] = MethodRegistry("quantization method", "method")
for _method in (RTN(), GPTQ(), SmoothQuant(), AWQ()):
    METHODS.add(_method.name, _method)
