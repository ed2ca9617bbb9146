"""--format gguf: squeeze's codes written as GGUF blocks, read back by the gguf package, by
transformers' GGUF loader and by squeeze itself, with the numbers squeeze evaluated; every scheme
or model the writer cannot express is one line, exit 2, nothing written; llama.cpp itself loads the
files, tokenizes, generates and computes the same logits (last tests here, and benchmarks/gguf_llamacpp.py)."""

import importlib.util
import itertools
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

from squeeze.cli import app
from squeeze.formats import quantized_format
from squeeze.formats.gguf_blocks import BLOCK_TYPES, as_stored, pack_layer
from squeeze.formats.gguf_meta import permute_rows, tokenizer_metadata
from squeeze.models import inspect_model, load_model
from squeeze.quant.apply import QuantizeConfig, quantize_model
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.scheme import scheme_from_options
from squeeze import chain
from squeeze.recipes import QuantizeStage, RecipeError, recipe_from_stages

runner = CliRunner()
FAST = ["--eval-tokens", "1024", "--seq-len", "64", "--calib-samples", "2"]
TEXT = ["The quick brown fox jumps over the lazy dog.", "Numbers 12345 and words, words, words.", "squeeze makes models smaller"]
SCHEMES = {"q4_0": dict(bits=4), "q4_1": dict(bits=4, asym=True), "q8_0": dict(bits=8)}


def bpe_tokenizer(digits: bool = False) -> transformers.PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (GPT-2's scheme; SmolLM2's split with ``digits``) trained here."""
    tok = Tokenizer(models.BPE())
    level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), level]) if digits else level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>",
    )
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    return fast


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory) -> Path:
    """A 2-block hidden-64 random Llama (9 heads would not divide; 4 query, 2 key/value heads) with a byte-level BPE tokenizer."""
    out = tmp_path_factory.mktemp("bpe_llama")
    tokenizer = bpe_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _layer(kind: str, seed: int = 0) -> QuantizedLinear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(96, 8, bias=False)
    with torch.no_grad():
        linear.weight[0, :32] = linear.weight[0, :32].abs()  # an all-positive block: zero point at the bottom
    scheme = scheme_from_options(mode="per-group", group_size=32, checkpoint="gguf", **SCHEMES[kind])
    return QuantizedLinear.from_linear(linear, scheme)


@pytest.mark.parametrize("kind", list(BLOCK_TYPES))
def test_blocks_hold_squeezes_numbers(kind: str) -> None:
    """The gguf package (llama.cpp's reference arithmetic) dequantizes the packed blocks to the
    weight squeeze computed: exactly for Q4_0 and Q8_0, to float16's rounding of Q4_1's minimum."""
    layer = _layer(kind)
    packed = pack_layer(layer, BLOCK_TYPES[kind])
    assert packed.dtype == np.uint8 and packed.shape == (8, 3 * BLOCK_TYPES[kind].block_bytes)
    theirs = torch.from_numpy(gguf.quants.dequantize(packed, BLOCK_TYPES[kind].ggml).copy())
    ours = layer.dequantized_weight(torch.float32)
    step = layer.weight_scale.float().repeat_interleave(32, dim=1)
    if kind == "q4_1":
        assert (theirs - ours).abs().max() <= (16 * step * 2.0**-11).max()
        assert (theirs - ours).abs().max() > 0  # the rounding of m is real, and bounded
    else:
        assert torch.equal(theirs, ours)


def test_rows_are_permuted_as_llamacpp_reads_rotary_pairs() -> None:
    config = transformers.LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    rows = torch.arange(16).reshape(16, 1)
    permuted = permute_rows("blk.0.attn_q.weight", rows, config).flatten().tolist()
    # head 0 holds rows 0..7 with rotary halves (0..3, 4..7): pairs become neighbours
    assert permuted[:8] == [0, 4, 1, 5, 2, 6, 3, 7] and permuted[8:] == [8, 12, 9, 13, 10, 14, 11, 15]
    keys = permute_rows("blk.0.attn_k.weight", torch.arange(8).reshape(8, 1), config).flatten().tolist()
    assert keys == [0, 4, 1, 5, 2, 6, 3, 7]
    assert permute_rows("blk.0.attn_v.weight", rows, config) is rows


def _quantize_and_write(
    folder: Path, out: Path, kind: str, method: str, embeddings: str = "f16", ignore: tuple[str, ...] = ("lm_head",), signed_scale: bool | None = None,
):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    scheme = scheme_from_options(mode="per-group", group_size=32, checkpoint="gguf", signed_scale=signed_scale, **SCHEMES[kind])
    options = {"gguf_type": kind, "gguf_embeddings": embeddings}
    config = QuantizeConfig(scheme=scheme, method=method, format="gguf", format_options=options, ignore=ignore)
    fmt = quantized_format("gguf", options)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(1))
    quantize_model(model, config, [{"input_ids": ids}] if method == "gptq" else None)
    fmt.round_kept(model)
    written = fmt.write(model, scheme, [], out, tokenizer, method={"method": method})
    return model, tokenizer, written, ids


@pytest.mark.parametrize("kind,method,embeddings,ignore", [
    ("q4_0", "gptq", "f16", ("lm_head",)),
    ("q4_1", "rtn", "f32", ("lm_head",)),
    ("q8_0", "rtn", "q8_0", ("lm_head",)),
    ("q4_0", "rtn", "f16", ("lm_head", "*.k_proj")),  # a k projection left in F16 still gets llama.cpp's row order
])
def test_file_reloads_with_the_logits_squeeze_evaluated(bpe_llama: Path, tmp_path: Path, kind, method, embeddings, ignore) -> None:
    out = tmp_path / "out"
    model, tokenizer, written, ids = _quantize_and_write(bpe_llama, out, kind, method, embeddings, ignore)
    assert [f.name for f in written.files] == ["model.gguf"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    # transformers' GGUF loader (dequantizes with the gguf package, undoes the q/k row order)
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits
    tolerance = 2e-3 if kind == "q4_1" else 1e-4
    assert (ours - theirs).abs().max() < tolerance
    # squeeze reads the output folder back as a model (it holds one .gguf file)
    loaded = load_model(str(out))
    with torch.no_grad():
        again = loaded.model(input_ids=ids).logits
    assert (again - theirs).abs().max() < 1e-5
    assert loaded.tokenizer("words, words").input_ids == tokenizer("words, words").input_ids


def test_the_balanced_grid_writes_q4_0_too(bpe_llama: Path, tmp_path: Path) -> None:
    """``--no-signed-scale``: compressed-tensors' balanced grid (positive scales, codes -8..7) fits
    Q4_0 blocks as well, and the file reloads with the logits squeeze evaluated."""
    model, _, _, ids = _quantize_and_write(bpe_llama, tmp_path / "out", "q4_0", "rtn", signed_scale=False)
    assert (model.model.layers[0].mlp.up_proj.weight_scale > 0).all()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ours - theirs(input_ids=ids).logits).abs().max() < 1e-4


def test_unquantized_tensors_are_given_the_stored_values(bpe_llama: Path, tmp_path: Path) -> None:
    model, *_ = _quantize_and_write(bpe_llama, tmp_path / "out", "q4_0", "rtn", "q8_0")
    embedding = model.model.embed_tokens.weight.detach()
    assert torch.equal(as_stored(embedding, "q8_0"), embedding)  # already on the Q8_0 grid: idempotent
    original = transformers.AutoModelForCausalLM.from_pretrained(bpe_llama).model.embed_tokens.weight.detach()
    assert not torch.equal(embedding, original)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_metadata_says_what_llamacpp_reads(bpe_llama: Path, tmp_path: Path) -> None:
    model, tokenizer, written, _ = _quantize_and_write(bpe_llama, tmp_path / "out", "q4_0", "rtn")
    reader = gguf.GGUFReader(written.files[0])
    field = {name: f.contents() for name, f in reader.fields.items()}
    assert field["general.architecture"] == "llama" and field["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert field["general.name"] == bpe_llama.name  # the folder, not its local path
    assert field["llama.block_count"] == 2 and field["llama.attention.head_count"] == 4
    assert field["llama.attention.head_count_kv"] == 2 and field["llama.rope.dimension_count"] == 16
    assert field["llama.embedding_length"] == 64 and field["llama.feed_forward_length"] == 128
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    assert len(field["tokenizer.ggml.tokens"]) == model.config.vocab_size
    assert field["tokenizer.ggml.tokens"][tokenizer.eos_token_id] == "<|im_end|>"
    assert field["tokenizer.ggml.token_type"][tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert field["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert field["tokenizer.chat_template"] == tokenizer.chat_template
    assert json.loads(field["squeeze.method"]) == {"method": "rtn"}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "F16"
    assert types["blk.1.ffn_norm.weight"] == "F32" and "output.weight" not in types  # tied head: llama.cpp reuses token_embd
    info = inspect_model(str(tmp_path / "out"))
    assert info["gguf_types"] == {"F16": 1, "F32": 5, "Q4_0": 14}


def test_smollm_digit_split_and_padded_vocabulary() -> None:
    tokenizer = bpe_tokenizer(digits=True)
    meta = tokenizer_metadata(tokenizer, len(tokenizer) + 3)
    assert meta.pre == "smollm"
    assert meta.tokens[-3:] == [f"[PAD{len(tokenizer) + i}]" for i in range(3)] and meta.token_types[-1] == gguf.TokenType.UNUSED
    assert not meta.add_bos


def test_defaults_follow_the_scheme() -> None:
    """Options left open take GGUF's shape: groups of 32; AutoRound's 4 bits are Q4_0, AWQ's asymmetric ones Q4_1, RTN's and GPTQ's 8 Q8_0."""
    for method, kind in (("autoround", "q4_0"), ("awq", "q4_1"), ("rtn", "q8_0"), ("gptq", "q8_0")):
        config = QuantizeStage(method=method, format="gguf").config(None)
        assert config.scheme.weights.group_size == 32
        assert quantized_format("gguf", config.format_options).block_type(config.scheme).name == kind
    config = QuantizeStage(format="gguf", gguf_type="q4_1").config(None)
    assert (config.scheme.weights.num_bits, config.scheme.weights.symmetric) == (4, False)


@pytest.mark.parametrize("args,message", [
    (["--bits", "4", "--group-size", "64"], "has no such GGUF type: use --mode per-group --group-size 32"),
    (["--bits", "3"], "has no such GGUF type"),
    (["--gguf-type", "q4_0", "--asym"], "Q4_0 (4-bit symmetric, blocks of 32)"),
    (["--act", "per-token"], "stores weights only"),
    (["--gguf-type", "q5_0"], "unknown GGUF block type 'q5_0' for --gguf-type"),
    (["--gguf-embeddings", "q6_k"], "for --gguf-embeddings"),
    (["--scale-dtype", "float32"], "stores float16 scales"),
])
def test_impossible_schemes_are_refused(bpe_llama: Path, tmp_path: Path, args, message) -> None:
    out = tmp_path / "out"
    result = run("quantize", bpe_llama, "--format", "gguf", *args, *FAST, "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def test_format_option_of_another_format_is_refused(bpe_llama: Path, tmp_path: Path) -> None:
    result = run("quantize", bpe_llama, "--format", "gptq", "--gguf-type", "q4_0", *FAST, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--gguf-type is an option of another format than gptq" in result.stderr


def test_unwritable_tokenizer_and_architecture_are_refused_before_loading(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", tiny_llama_dir, "--format", "gguf", *FAST, "--out", tmp_path / "a")  # MiniLM's WordPiece tokenizer
    assert result.exit_code == 2 and "writes byte-level BPE tokenizers" in result.stderr
    assert "WordPiece model" in result.stderr and not (tmp_path / "a").exists()
    result = run("quantize", tiny_bert_dir, "--format", "gguf", *FAST, "--out", tmp_path / "b")
    assert result.exit_code == 2 and "writes llama, mistral models" in result.stderr and not (tmp_path / "b").exists()


def test_cli_writes_a_gguf_with_its_report(bpe_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "q4"
    result = run("quantize", bpe_llama, "--method", "gptq", "--bits", "4", "--format", "gguf", *FAST, "--generation-prompts", "0", "--out", out, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf", "report.json", "report.md"]
    assert report["settings"]["format"].startswith("GGUF Q4_0")
    assert report["size"]["disk_bytes_after"] == (out / "model.gguf").stat().st_size
    assert "llama-cli -m" in (out / "report.md").read_text()



def test_recipe_prunes_then_writes_gguf(bpe_llama: Path, tmp_path: Path, small_text: Path) -> None:
    """A recipe stage takes the format's options as keys; the next stage (or squeeze eval) reads the GGUF folder."""
    recipe = recipe_from_stages([
        {"prune": {"method": "magnitude", "sparsity": 0.5}},
        {"quantize": {"bits": 4, "format": "gguf", "gguf_type": "q4_0", "gguf_embeddings": "q8_0"}},
    ])
    summary = chain.run_recipe(recipe, str(bpe_llama), tmp_path / "run", data=str(small_text), seq_len=32, eval_tokens=256, generation_prompts=0)
    folder = tmp_path / "run" / summary["stages"][1]["folder"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(folder / "model.gguf").tensors}
    assert types["blk.0.ffn_up.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    report = json.loads((folder / "report.json").read_text())
    assert any("zero codes" in note for note in report["notes"])  # the pruned zeros, stored as codes
    with pytest.raises(RecipeError) as caught:
        chain.plan_recipe(recipe_from_stages([{"quantize": {"format": "gptq", "gguf_type": "q4_0"}}]), str(bpe_llama))
    assert "gguf_type: is an option of another format than gptq" in caught.value.problems[0], caught.value.problems


# llama.cpp itself, through llama-cpp-python (the ``llamacpp`` extra). It multiplies Q4_0 / Q4_1 /
# Q8_0 weights by activations it first rounds to 8 bits in blocks of 32 (its Q8 dot products), so
# its logits differ from squeeze's float ones by that rounding: bounded here on the tiny model, and
# measured on SmolLM2 in benchmarks/gguf_llamacpp.py. Without the extra (built from source, minutes)
# these tests are skipped, saying so; the writer's own tests above always run.
needs_llamacpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed (pip install -e .[llamacpp])",
)


def _llama(path: Path, n_ctx: int = 64, logits_all: bool = True):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, n_threads=2, verbose=False, seed=0)


@needs_llamacpp
@pytest.mark.parametrize("kind,method", [("q4_0", "gptq"), ("q4_1", "rtn"), ("q8_0", "rtn")])
def test_llamacpp_computes_squeezes_logits(bpe_llama: Path, tmp_path: Path, kind: str, method: str) -> None:
    model, tokenizer, written, ids = _quantize_and_write(bpe_llama, tmp_path / "out", kind, method, "f32")
    llm = _llama(written.files[0])
    assert llm.n_vocab() == model.config.vocab_size
    row = ids[0]
    llm.eval(row.tolist())
    theirs = torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32))
    with torch.no_grad():
        ours = model(input_ids=row[None]).logits[0]
    spread = float(ours.std())
    error = float((ours - theirs).abs().max())
    # llama.cpp's 8-bit activations: a small share of the logits' spread, far below what quantization changed
    original = transformers.AutoModelForCausalLM.from_pretrained(bpe_llama).eval()
    with torch.no_grad():
        change = float((original(input_ids=row[None]).logits[0] - ours).abs().max())
    assert error < 0.05 * spread and error < change, (error, spread, change)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


@needs_llamacpp
def test_llamacpp_tokenizes_and_generates(bpe_llama: Path, tmp_path: Path) -> None:
    model, tokenizer, written, _ = _quantize_and_write(bpe_llama, tmp_path / "out", "q4_0", "rtn")
    llm = _llama(written.files[0], n_ctx=128, logits_all=False)
    text = "The quick brown fox, 12345 words"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text).input_ids
    prompt = tokenizer("The quick brown").input_ids
    generated = list(itertools.islice(llm.generate(prompt, temp=0.0, top_k=1), 8))
    assert len(generated) == 8 and all(0 <= t < model.config.vocab_size for t in generated)
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
    assert generated[0] == first


def test_gguf_symmetric_grid_is_llamacpps() -> None:
    """Symmetric GGUF schemes use llama.cpp's grid: the largest-magnitude weight of each block, with
    its sign, lands exactly on code -8 (so the scale is negative when it is positive), and RTN gives
    llama.cpp's own Q4_0 codes but where a value sits on a rounding boundary of the two float16 scales."""
    scheme = scheme_from_options(mode="per-group", group_size=32, bits=4, checkpoint="gguf")
    assert scheme.weights.signed_scale and "signed-scale" in scheme.describe()
    assert not scheme_from_options(mode="per-group", group_size=32, bits=4, checkpoint="gguf", asym=True).weights.signed_scale
    assert not scheme_from_options(mode="per-group", group_size=32, bits=4).weights.signed_scale  # compressed-tensors' grid
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 16, bias=False)
    layer = QuantizedLinear.from_linear(linear, scheme)
    blocks = linear.weight.detach().reshape(16, 2, 32)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
    scale = layer.weight_scale.float()
    assert torch.equal(torch.sign(scale), -torch.sign(extreme))
    codes = layer.weight_codes.reshape(16, 2, 32).gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert (codes == -8).all()
    reference = gguf.quants.dequantize(gguf.quants.quantize(linear.weight.detach().numpy(), gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0)
    ours = layer.dequantized_weight(torch.float32)
    step = scale.abs().repeat_interleave(32, dim=1)
    apart = (torch.from_numpy(reference.copy()) - ours).abs() / step  # in steps; float16 rounds their scale to nearest, ours down
    assert (apart < 0.01).float().mean() > 0.97 and apart.max() <= 1.01


@pytest.mark.parametrize("method", ["gptq", "awq", "autoround"])
def test_calibrated_methods_keep_the_signed_grid(bpe_llama: Path, tmp_path: Path, method: str) -> None:
    """GPTQ's clip search, AWQ's search and AutoRound's learned ranges stay on llama.cpp's grid:
    signed scales, each block's codes reaching -8 on the side of its largest weight."""
    model = transformers.AutoModelForCausalLM.from_pretrained(bpe_llama).eval()
    scheme = scheme_from_options(mode="per-group", group_size=32, bits=4, checkpoint="gguf")
    options = {"autoround_iters": 4} if method == "autoround" else None
    config = QuantizeConfig(scheme=scheme, method=method, format="gguf", options=options)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    quantize_model(model, config, [{"input_ids": ids}])
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantizedLinear)
    assert (layer.weight_scale < 0).any() and (layer.weight_scale > 0).any()
    packed = pack_layer(layer, BLOCK_TYPES["q4_0"])
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(packed, BLOCK_TYPES["q4_0"].ggml).copy()), layer.dequantized_weight(torch.float32))
