"""The format registries: names and choices, output-name suffixes, the scheme bnb-nf4 fixes, layer
sizes from the layouts, and checkpoints recognised and read back through ``load_model``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.formats import (
    FORMATS,
    PRUNED_FORMATS,
    QUANTIZED_FORMATS,
    check_format,
    describe_format,
    recognise,
    weight_bytes,
    write,
)
from squeeze.formats.sparse import LOADING_SNIPPET
from squeeze.models import is_quantized_folder, is_sparse_folder, load_model
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.nf4 import NF4Linear
from squeeze.quant.scheme import scheme_from_options

W4_G32 = dict(mode="per-group", bits=4, group_size=32)


def test_unknown_formats_list_the_choices() -> None:
    quantized = r"unknown format 'safetensors'; choose one of: compressed-tensors, gptq, bnb-int8, bnb-nf4, gguf$"
    with pytest.raises(SqueezeError, match=quantized):
        QUANTIZED_FORMATS.get("safetensors")
    with pytest.raises(SqueezeError, match=quantized):
        check_format("safetensors", scheme_from_options(), "rtn")
    with pytest.raises(SqueezeError, match=r"unknown sparse checkpoint format 'bitmask'; choose one of: sparse-bitmask, dense$"):
        PRUNED_FORMATS.get("bitmask")
    assert FORMATS == ("compressed-tensors", "gptq", "bnb-int8", "bnb-nf4", "gguf")  # the default first


def test_suffixes_and_default_output_names() -> None:
    assert {f.name: f.suffix for f in QUANTIZED_FORMATS} == {
        "compressed-tensors": "", "gptq": "-gptq", "bnb-int8": "-bnb-int8", "bnb-nf4": "-bnb-nf4", "gguf": "-gguf",
    }
    assert {f.name: f.suffix for f in PRUNED_FORMATS} == {"sparse-bitmask": "", "dense": "-dense"}
    names = {f.name: f.output_name("W4A16-per-group64") for f in QUANTIZED_FORMATS}
    # NF4 names itself: its label replaces the scheme part
    assert names == {
        "compressed-tensors": "W4A16-per-group64",
        "gptq": "W4A16-per-group64-gptq",
        "bnb-int8": "W4A16-per-group64-bnb-int8",
        "bnb-nf4": "nf4-bnb-nf4",
        "gguf": "W4A16-per-group64-gguf",
    }


def test_nf4_fixes_its_scheme_and_its_layer() -> None:
    nf4, ct = QUANTIZED_FORMATS.get("bnb-nf4"), QUANTIZED_FORMATS.get("compressed-tensors")
    assert nf4.fixed_scheme.fill(None, None, None) == ("per-group", 4, 64)
    assert nf4.fixed_scheme.fill("per-group", None, 128) == ("per-group", 4, 128)  # explicit options win; check refuses them
    assert nf4.fixed_scheme.fill("per-channel", None, None) == ("per-channel", 4, None)
    assert [f.name for f in QUANTIZED_FORMATS if f.fixed_scheme] == ["bnb-nf4"]
    scheme = scheme_from_options(mode="per-group", bits=4, group_size=64)
    nf4.check(scheme, "rtn")
    with pytest.raises(SqueezeError, match="--method rtn"):
        nf4.check(scheme, "gptq")
    assert nf4.describe_scheme(scheme) == "NF4 (bitsandbytes), absmax blocks of 64"
    assert ct.describe_scheme(scheme) == scheme.describe()
    linear = nn.Linear(128, 16)
    assert isinstance(nf4.quantized_layer(linear, scheme), NF4Linear) and nf4.layer_type is NF4Linear
    for fmt in (f for f in QUANTIZED_FORMATS if f is not nf4):
        assert isinstance(fmt.quantized_layer(linear, scheme), QuantizedLinear) and fmt.layer_type is QuantizedLinear


def test_descriptions() -> None:
    scheme = scheme_from_options(**W4_G32)
    assert describe_format("compressed-tensors", scheme) == "compressed-tensors (pack-quantized)"
    assert describe_format("gptq", scheme) == "GPTQ (qweight/qzeros/scales/g_idx)"
    assert PRUNED_FORMATS.get("dense").describe() == "dense (compressed-tensors sparsity_config)"


def test_weight_bytes_follow_the_layouts() -> None:
    """Bytes of one 64 x 128 layer's weight data, from each layout's definition (bias excluded)."""
    out_features, in_features = 64, 128
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    n = out_features * in_features
    w4 = scheme_from_options(**W4_G32)  # symmetric: float16 scales, no zero points stored
    groups = in_features // 32
    layer = QUANTIZED_FORMATS.get("compressed-tensors").quantized_layer(linear, w4)
    # int4 codes packed 8 per int32 word, one float16 scale per group of 32
    assert weight_bytes("compressed-tensors", layer) == n // 2 + out_features * groups * 2
    # gptq adds the zero points (4-bit, packed) and g_idx (one int32 per input)
    assert weight_bytes("gptq", layer) == n // 2 + groups * out_features // 2 + out_features * groups * 2 + in_features * 4
    int8 = QUANTIZED_FORMATS.get("bnb-int8").quantized_layer(linear, scheme_from_options(bits=8))
    assert weight_bytes("bnb-int8", int8) == n + out_features * 4  # int8 codes, one float32 SCB per row
    nf4 = QUANTIZED_FORMATS.get("bnb-nf4")
    nf4_layer = nf4.quantized_layer(linear, scheme_from_options(mode="per-group", bits=4, group_size=64))
    assert nf4.weight_bytes(nf4_layer) == n // 2 + (n // 64) * 4  # two codes per byte, one float32 absmax per block
    weight = linear.weight.detach() * (torch.rand(out_features, in_features) > 0.5)
    assert PRUNED_FORMATS.get("dense").weight_bytes(weight, torch.bfloat16) == 2 * n
    nonzero = int((weight != 0).sum())
    assert PRUNED_FORMATS.get("sparse-bitmask").weight_bytes(weight) == 4 * nonzero + n // 8 + 8 * out_features + 16


# --- written, recognised, read back ----------------------------------------------------------


def _block_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name]


@pytest.fixture(scope="module")
def written(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny Llama quantized (RTN W4 g32) in compressed-tensors and gptq, and pruned (every other
    weight) in sparse-bitmask and dense; with the in-memory models they came from."""
    work = tmp_path_factory.mktemp("formats")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    scheme = scheme_from_options(**W4_G32)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    names = _block_linears(quantized)
    for name in names:
        parent, _, child = name.rpartition(".")
        linear = quantized.get_submodule(name)
        setattr(quantized.get_submodule(parent), child, QUANTIZED_FORMATS.get("compressed-tensors").quantized_layer(linear, scheme))
    ignored = [n for n, m in quantized.named_modules() if isinstance(m, nn.Linear)]
    notes = {}
    for fmt in ("compressed-tensors", "gptq"):
        notes[fmt] = write(fmt, quantized, scheme, ignored, work / fmt, tokenizer, torch.float32).notes
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        for name in names:
            pruned.get_submodule(name).weight[:, ::2] = 0
    for fmt in PRUNED_FORMATS:
        notes[fmt.name] = fmt.write(pruned, "unstructured", 0.5, names, work / fmt.name, tokenizer).notes
    return {"work": work, "quantized": quantized, "pruned": pruned, "notes": notes, "layers": len(names)}


def test_each_folder_is_recognised_by_its_reader(written: dict, tiny_llama_dir: Path) -> None:
    work = written["work"]
    assert recognise(work / "compressed-tensors") is QUANTIZED_FORMATS.get("compressed-tensors")
    assert recognise(work / "sparse-bitmask") is PRUNED_FORMATS.get("sparse-bitmask")
    # read by their consumers (or from_pretrained), not by a reader of squeeze's
    for plain in (work / "gptq", work / "dense", tiny_llama_dir):
        assert recognise(plain) is None, plain
    assert is_quantized_folder(work / "compressed-tensors") and not is_quantized_folder(work / "sparse-bitmask")
    assert is_sparse_folder(work / "sparse-bitmask") and not is_sparse_folder(work / "dense")
    assert recognise(work / "no-such-folder") is None


def test_compressed_tensors_reads_back_through_load_model(written: dict) -> None:
    loaded = load_model(str(written["work"] / "compressed-tensors")).model
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == written["layers"]
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        # the same codes and scales, so the same arithmetic as the model that was written
        torch.testing.assert_close(loaded(ids).logits, written["quantized"](ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["sparse-bitmask", "dense"])
def test_pruned_folders_read_back_through_load_model(written: dict, fmt: str) -> None:
    loaded = load_model(str(written["work"] / fmt)).model
    expected = written["pruned"].state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_notes_and_loading_instructions(written: dict, tmp_path: Path) -> None:
    notes = written["notes"]
    assert notes["compressed-tensors"] == [] and notes["dense"] == []
    assert len(notes["sparse-bitmask"]) == 1 and "--format dense" in notes["sparse-bitmask"][0]
    sparse, dense = PRUNED_FORMATS.get("sparse-bitmask"), PRUNED_FORMATS.get("dense")
    snippet = LOADING_SNIPPET.format(folder="out", auto_class="AutoModel")
    assert sparse.loading(Path("out"), "encoder") == "```python\n" + snippet + "```\n"
    assert dense.loading(Path("out"), "causal") == '`transformers.AutoModelForCausalLM.from_pretrained("out")`: the zeros are stored dense.\n'
    assert QUANTIZED_FORMATS.get("gptq").loading(Path("out"), "causal") == ""  # from_pretrained is enough


def test_sparsity_is_recorded_or_noted(written: dict, tmp_path: Path) -> None:
    """A pruned-then-quantized model: compressed-tensors records the sparse layers, the others say
    they cannot."""
    model, scheme = written["quantized"], scheme_from_options(**W4_G32)
    sparsity = ("2:4", 0.5, ["model.layers.0.mlp.up_proj"])
    write("compressed-tensors", model, scheme, [], tmp_path / "ct", sparsity=sparsity)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert config["format"] == "dense" and config["sparsity_structure"] == "2:4" and config["targets"] == sparsity[2]
    notes = write("gptq", model, scheme, [], tmp_path / "gptq", sparsity=sparsity).notes
    assert notes[-1] == "gptq has no field for sparsity: the zeros are stored as zero codes and a loader sees a dense layer"
