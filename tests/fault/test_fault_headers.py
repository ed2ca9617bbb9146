"""Model files that lie (issue #18, defects 3 and 4): a config.json whose sizes the weights do not
have, and safetensors headers the old check let through (dtypes it did not list, negative
shapes). Each is one line and exit 2 before anything is allocated; fuzzed headers and configs
are either read or refused in one line, never another exception, never a large allocation."""

from __future__ import annotations

import json
import resource
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from squeeze.cli import app
from squeeze.errors import SqueezeError
from squeeze.models import inspect_model, load_model, meta_model, resolve_model
from squeeze.models.checks import CONFIG_RANGES, read_safetensors_header

runner = CliRunner()
FAST = ["--eval-tokens", "256", "--seq-len", "32", "--calib-samples", "2", "--no-eval", "--generation-prompts", "0", "-q"]
# The tiny Llama's model.safetensors holds 7.9 MB of weights; a config trusted over it allocates
# gigabytes, so any growth of the peak memory beyond this is a config the checks let through.
MAX_GROWTH_BYTES = 400 * 2**20
FIELDS = ["hidden_size", "vocab_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"]
DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I8": torch.int8, "U8": torch.uint8,
    "C64": torch.complex64,
}  # fmt: skip
# every dtype a fuzzed header may end up with that torch reads, as safetensors gives it
READ_AS = {**DTYPES, "F8_E4M3": torch.float8_e4m3fn, "BOOL": torch.bool, "U16": torch.uint16}


def peak_rss() -> int:
    """The process's peak resident memory so far, in bytes (Linux counts it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_line(exc: SqueezeError) -> str:
    text = str(exc)
    assert text.strip() and "\n" not in text, repr(text)
    return text


def with_config(model: Path, folder: Path, change) -> Path:
    """A copy of ``model`` in ``folder`` whose config.json is ``change(config)``; the other files
    are links to the original's."""
    folder.mkdir()
    for path in model.iterdir():
        if path.name != "config.json":
            (folder / path.name).symlink_to(path)
    config = json.loads((model / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))
    return folder


def split_file(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def joined(header: dict | list | str, body: bytes) -> bytes:
    raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def with_weights(model: Path, folder: Path, data: bytes) -> Path:
    """A copy of ``model`` in ``folder`` whose model.safetensors is ``data``."""
    folder.mkdir()
    for path in model.iterdir():
        if path.name != "model.safetensors":
            (folder / path.name).symlink_to(path)
    (folder / "model.safetensors").write_bytes(data)
    return folder


def refused(spec: str, *, load: bool = False) -> str | None:
    """Resolve ``spec`` and build its meta model (and load it, if ``load``): None when that
    works, the one-line message when it is refused; any other exception fails the test."""
    try:
        source = resolve_model(spec)
        meta_model(source)
        if load:
            load_model(source)
    except SqueezeError as exc:
        return one_line(exc)
    return None


# -- defect 3: config.json trusted over the weights ---------------------------------------------


@pytest.mark.parametrize(
    "field, value, says",
    [
        (
            "hidden_size", 8192,
            "with hidden_size = 8192, the model's model.embed_tokens.weight is [30522, 8192], but model.safetensors holds it as [30522, 64]",
        ),
        ("hidden_size", 10**9, "hidden_size = 1000000000; it must be a whole number"),
        ("vocab_size", 10**11, "vocab_size = 100000000000; it must be a whole number"),
        ("num_hidden_layers", 1_000_000, "num_hidden_layers = 1000000; it must be a whole number"),
        ("num_hidden_layers", 3, "num_hidden_layers = 3, but the checkpoint holds no tensor of block model.layers.2"),
        ("num_hidden_layers", 1, "num_hidden_layers = 1, but the checkpoint holds 2 blocks"),
        ("intermediate_size", 512, "with intermediate_size = 512, the model's model.layers.0.mlp.down_proj.weight is [64, 512]"),
        ("num_attention_heads", 8, "with num_attention_heads = 8, the model's model.layers.0.self_attn.o_proj.weight is [64, 128]"),
        ("vocab_size", 1000, "with vocab_size = 1000, the model's model.embed_tokens.weight is [1000, 64]"),
        ("hidden_size", 64.0, "hidden_size = 64.0; it must be a whole number"),
        ("hidden_size", "64", "hidden_size = '64'; it must be a whole number"),
        ("num_attention_heads", -4, "num_attention_heads = -4; it must be a whole number"),
    ],
)
def test_config_against_weights(tiny_llama_dir: Path, tmp_path: Path, field: str, value, says: str) -> None:
    bad = with_config(tiny_llama_dir, tmp_path / "bad", lambda config: {**config, field: value})
    before, start = peak_rss(), time.perf_counter()
    message = refused(str(bad), load=True)
    assert message is not None and says in message
    assert time.perf_counter() - start < 20 and peak_rss() - before < MAX_GROWTH_BYTES


def test_a_missing_size_takes_the_default_and_is_held_against_the_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # without hidden_size, transformers builds Llama's default 4096 wide
    bad = with_config(tiny_llama_dir, tmp_path / "bad", lambda config: {k: v for k, v in config.items() if k != "hidden_size"})
    assert "hidden_size" not in json.loads((bad / "config.json").read_text())
    message = refused(str(bad))
    assert message is not None and "model.embed_tokens.weight is [30522, 4096]" in message


def test_a_fitting_config_still_loads(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # sizes written differently but meaning the same (head_dim dropped: transformers derives 64 / 4)
    same = with_config(tiny_llama_dir, tmp_path / "same", lambda config: {k: v for k, v in config.items() if k != "head_dim"})
    assert refused(str(same), load=True) is None
    assert inspect_model(str(same))["params_total"] == inspect_model(str(tiny_llama_dir))["params_total"]


@pytest.mark.parametrize("command", ["inspect", "quantize", "prune", "eval", "generate", "distill", "run"])
def test_every_command_refuses_a_config_the_weights_do_not_fit(command: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    bad = str(with_config(tiny_llama_dir, tmp_path / "bad", lambda config: {**config, "hidden_size": 8192}))
    text = tmp_path / "text.txt"
    text.write_text("A few words of text, enough to read. " * 50)
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: r\nstages:\n  - quantize:\n      method: rtn\n")
    args = {
        "inspect": ["inspect", bad],
        "quantize": ["quantize", bad, "--out", out, *FAST],
        "prune": ["prune", bad, "--out", out, *FAST],
        "eval": ["eval", bad, "--data", text, "--eval-tokens", "64", "--seq-len", "32"],
        "generate": ["generate", bad, "--prompt", "hello"],
        "distill": ["distill", bad, "layers:1", "--data", text, "--steps", "1", "--seq-len", "32", "--no-eval", "--out", out],
        "run": ["run", recipe, "--model", bad, "--out", out],
    }[command]
    before, start = peak_rss(), time.perf_counter()
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "hidden_size = 8192" in lines[0], result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert time.perf_counter() - start < 60 and peak_rss() - before < MAX_GROWTH_BYTES


# -- defect 4: headers the old check let through -------------------------------------------------


def small_file(folder: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    save_file(tensors, folder / "x.safetensors")
    return split_file((folder / "x.safetensors").read_bytes())


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda h: h["a"].update(dtype="C64"), "has 64 bytes for 16 C64 values"),  # C64 was unlisted: its length went unchecked
        (lambda h: h["a"].update(shape=[-4, -4]), "has shape [-4, -4]"),  # multiplies to 16, the old check's count
        (lambda h: h["a"].update(shape=[4.0, 4]), "has shape [4.0, 4]"),
        (lambda h: h["a"].update(shape=[True, 16]), "has shape [True, 16]"),
        (lambda h: h["a"].update(dtype="F4"), "dtype F4, which torch cannot read as stored"),
        (lambda h: h["a"].update(dtype="Q4"), "dtype Q4, which is not a safetensors dtype torch reads"),
        (lambda h: h["a"].update(data_offsets=[64, 0]), "spans bytes 64..0"),
        (lambda h: h["a"].update(data_offsets=[0, 64, 0]), "data_offsets [0, 64, 0]"),
        (lambda h: h["b"].update(data_offsets=[0, 32]), "overlaps another"),
        (lambda h: h["a"].update(extra=1), "needs exactly dtype, shape and data_offsets"),
        (lambda h: h.update(__metadata__={"format": 1}), "__metadata__ is not a map of strings to strings"),
        (lambda h: h.update(__metadata__=["pt"]), "__metadata__ is not a map of strings to strings"),
    ],
)
def test_header_entries_are_checked_strictly(tmp_path: Path, change, says: str) -> None:
    header, body = small_file(tmp_path, {"a": torch.zeros(4, 4), "b": torch.zeros(8)})
    change(header)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(joined(header, body))
    with pytest.raises(SqueezeError) as caught:
        read_safetensors_header(path)
    assert "is truncated or corrupt" in one_line(caught.value) and says in str(caught.value)


def with_gap(header: dict, body: bytes) -> bytes:
    header["b"]["data_offsets"] = [40, 104]  # b after 8 bytes nobody holds
    return joined(header, body[:32] + b"\0" * 8 + body[32:])


@pytest.mark.parametrize(
    "raw, says",
    [
        (lambda h, b: joined(h, b)[:-3], "spans bytes 32..96 but the data holds 93"),
        (lambda h, b: joined(h, b) + b"\0" * 8, "data holds 104 bytes but the tensors need 96"),
        (with_gap, "tensor b at bytes 40..104 leaves bytes 32..40 unused before it"),
        (lambda h, b: joined(" " + json.dumps(h), b), "header must start with {"),
        (lambda h, b: joined("[1, 2]", b), "header is not a JSON object"),
        (lambda h, b: joined('{"a": 1, "a": 2}', b), "key a appears twice"),
        (lambda h, b: struct.pack("<Q", 8) + b"{\xff\xfe}    " + b, "header is not valid JSON"),
        (lambda h, b: struct.pack("<Q", 2**62) + json.dumps(h).encode() + b, "header claims 4611686018427387904 bytes"),
        (lambda h, b: b"\x01\x02", "only 2 bytes"),
    ],
)
def test_header_layout_is_checked(tmp_path: Path, raw, says: str) -> None:
    header, body = small_file(tmp_path, {"a": torch.zeros(8), "b": torch.zeros(4, 4)})
    assert (header["a"]["data_offsets"], header["b"]["data_offsets"]) == ([0, 32], [32, 96])
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw(header, body))
    with pytest.raises(SqueezeError) as caught:
        read_safetensors_header(path)
    assert says in one_line(caught.value)


def test_a_complex_weight_is_refused_before_loading(tiny_llama_dir: Path, tmp_path: Path) -> None:
    state = load_file(tiny_llama_dir / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.complex64)  # a whole, readable C64 tensor
    folder = tmp_path / "complex"
    shutil.copytree(tiny_llama_dir, folder)
    save_file(state, folder / "model.safetensors")
    assert set(read_safetensors_header(folder / "model.safetensors")) == set(state)  # the header itself is sound
    message = refused(str(folder), load=True)
    assert message is not None and "model.norm.weight as complex numbers (C64)" in message
    result = runner.invoke(app, ["quantize", str(folder), "--out", str(tmp_path / "out"), *FAST])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1 and "C64" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", [{"dtype": "C64"}, {"shape": [-8, -8]}], ids=["c64", "negative-shape"])
def test_the_cli_refuses_what_the_old_check_let_through(tiny_llama_dir: Path, tmp_path: Path, change: dict) -> None:
    header, body = split_file((tiny_llama_dir / "model.safetensors").read_bytes())
    header["model.norm.weight"].update(change)  # [64] F32: 256 bytes, as 64 C64 values or 8 x 8 would not be
    folder = with_weights(tiny_llama_dir, tmp_path / "bad", joined(header, body))
    for args in (["inspect", folder], ["quantize", folder, "--out", tmp_path / "out", *FAST]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "model.safetensors is truncated or corrupt: tensor model.norm.weight" in lines[0]
    assert not (tmp_path / "out").exists()


# -- fuzzing ------------------------------------------------------------------------------------

ORIGINALS: dict[Path, dict] = {}
odd_values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=0, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.booleans(),
    st.none(),
    st.lists(st.integers(min_value=-3, max_value=300), max_size=3),
    st.just("missing"),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), odd_values, min_size=1, max_size=3))
def test_fuzzed_config_is_read_or_refused_in_one_line(tiny_llama_dir: Path, changes: dict) -> None:
    def change(config: dict) -> dict:
        config = {**config, **changes}
        return {k: v for k, v in config.items() if v != "missing"}

    original = ORIGINALS.setdefault(tiny_llama_dir, inspect_model(str(tiny_llama_dir)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = with_config(tiny_llama_dir, Path(tmp) / "m", change)
        before, start = peak_rss(), time.perf_counter()
        try:
            info = inspect_model(resolve_model(str(folder)))
        except SqueezeError as exc:
            one_line(exc)
        else:  # what is let through is a model the weights fit
            assert (info["params_total"], info["hidden_size"], info["vocab_size"], info["layers"]) == (
                original["params_total"], original["hidden_size"], original["vocab_size"], original["layers"]
            ), changes
        assert time.perf_counter() - start < 20, changes
        assert peak_rss() - before < MAX_GROWTH_BYTES, changes


def test_config_ranges_cover_the_fuzzed_fields() -> None:
    assert set(FIELDS) <= set(CONFIG_RANGES)


def mutate(header: dict, body: bytes, draw) -> bytes:
    """One random corruption of a safetensors file given as its header and body."""
    names = [n for n in header if n != "__metadata__"]
    name = draw(st.sampled_from(names))
    entry = header[name]
    kind = draw(st.sampled_from([
        "dtype", "shape", "offsets", "drop-key", "metadata", "truncate", "append", "length", "utf8", "not-object", "offset-shift",
    ]))  # fmt: skip
    if kind == "dtype":
        entry["dtype"] = draw(st.one_of(st.sampled_from(["C64", "F4", "F6_E2M3", "F8_E4M3", "I64", "BOOL", "U16", "f32", ""]), st.integers(), st.none()))
    elif kind == "shape":
        dim = st.one_of(st.integers(min_value=-(2**66), max_value=2**66), st.integers(-3, 70), st.floats(), st.booleans(), st.text(max_size=2))
        entry["shape"] = draw(st.one_of(st.lists(dim, max_size=4), dim))
    elif kind == "offsets":
        entry["data_offsets"] = draw(st.lists(st.one_of(st.integers(-5, len(body) + 5), st.integers(), st.floats()), max_size=3))
    elif kind == "offset-shift":
        shift = draw(st.integers(-8, 8))
        entry["data_offsets"] = [entry["data_offsets"][0] + shift, entry["data_offsets"][1] + draw(st.sampled_from([0, shift]))]
    elif kind == "drop-key":
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif kind == "metadata":
        strings = st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers()))
        header["__metadata__"] = draw(st.one_of(strings, st.text(), st.none()))
    data = joined(header, body)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=16))
    if kind == "length":
        return struct.pack("<Q", draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, len(data) + 8)))) + data[8:]
    if kind == "utf8":
        at = draw(st.integers(9, 8 + struct.unpack("<Q", data[:8])[0] - 1))
        return data[:at] + bytes([draw(st.integers(0x80, 0xFF))]) + data[at + 1 :]
    if kind == "not-object":
        return joined(json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.text(max_size=4)))), body)
    return data


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    tensors=st.dictionaries(
        st.sampled_from(["w", "b", "m.x"]), st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 4), max_size=3)), min_size=1, max_size=3,
    ),
)
def test_fuzzed_header_is_refused_in_one_line_or_read_by_safetensors(data, tensors: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        header, body = small_file(folder, {name: torch.zeros(shape, dtype=DTYPES[dtype]) for name, (dtype, shape) in tensors.items()})
        path = folder / "bad.safetensors"
        path.write_bytes(mutate(header, body, data.draw))
        try:
            held = read_safetensors_header(path)
        except SqueezeError as exc:
            assert "is truncated or corrupt" in one_line(exc)
            if "torch cannot read as stored" not in str(exc):  # F4 and F6: the format has them, torch not as stored
                # nothing else is refused that safetensors reads
                with pytest.raises(Exception):  # noqa: B017
                    with safe_open(str(path), "pt") as handle:
                        [handle.get_tensor(name) for name in handle.keys()]
            return
        # what the check lets through, safetensors and torch read, as the header says
        with safe_open(str(path), "pt") as handle:
            assert set(handle.keys()) == set(held)
            for name, stored in held.items():
                tensor = handle.get_tensor(name)
                assert (tuple(tensor.shape), tensor.dtype) == (stored.shape, READ_AS[stored.dtype])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_model_header_is_read_or_refused_in_one_line(tiny_llama_dir: Path, data) -> None:
    header, body = split_file((tiny_llama_dir / "model.safetensors").read_bytes())
    with tempfile.TemporaryDirectory() as tmp:
        folder = with_weights(tiny_llama_dir, Path(tmp) / "m", mutate(header, body, data.draw))
        before = peak_rss()
        refused(str(folder))  # one line, or a model whose weights fit
        if data.draw(st.integers(0, 4)) == 0:  # a few through the CLI: a table, or one red line
            result = runner.invoke(app, ["inspect", str(folder)])
            assert result.exit_code in (0, 2), result.output
            assert result.exit_code == 0 or len(result.stderr.strip().splitlines()) == 1
        assert peak_rss() - before < MAX_GROWTH_BYTES


# -- what the checkpoint does not back -----------------------------------------------------------


def renamed_weights(model: Path, folder: Path, rename) -> Path:
    """A copy of ``model`` whose tensors are renamed by ``rename`` (data unchanged)."""
    header, body = split_file((model / "model.safetensors").read_bytes())
    renamed = {name if name == "__metadata__" else rename(name): entry for name, entry in header.items()}
    return with_weights(model, folder, joined(renamed, body))


def test_weights_named_for_another_model_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = renamed_weights(tiny_llama_dir, tmp_path / "other", lambda name: f"encoder.{name}")
    message = refused(str(folder))
    assert message is not None and "none of the checkpoint's" in message and "model.embed_tokens.weight" in message


def test_a_large_weight_the_checkpoint_lacks_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # the embedding stored under a name transformers drops, and a config that makes it 64 M values
    folder = renamed_weights(tiny_llama_dir, tmp_path / "lacks", lambda name: name.replace("embed_tokens", "embed"))
    (folder / "config.json").unlink()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 1_000_000}))
    before = peak_rss()
    message = refused(str(folder), load=True)
    assert message is not None and "with vocab_size = 1000000, the model's model.embed_tokens.weight is [1000000, 64]" in message
    assert "no stored tensor fills it" in message and peak_rss() - before < MAX_GROWTH_BYTES


def test_large_buffers_the_config_asks_for_are_refused(tmp_path: Path) -> None:
    # GPT-Neo keeps a causal mask of max_position_embeddings² per block, outside its checkpoint
    config = transformers.GPTNeoConfig(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global"], 2]], max_position_embeddings=25_000,
    )
    with torch.device("meta"):
        model = transformers.GPTNeoForCausalLM(config)
    folder = tmp_path / "neo"
    folder.mkdir()
    config.save_pretrained(folder)
    save_file({name: torch.zeros(p.shape) for name, p in model.named_parameters()}, folder / "model.safetensors")
    before = peak_rss()
    message = refused(str(folder), load=True)
    assert message is not None and "GiB of buffers the checkpoint does not hold" in message and "bias is [1, 1, 25000, 25000]" in message
    assert peak_rss() - before < MAX_GROWTH_BYTES


@pytest.fixture(scope="module")
def quantized_llama(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama quantized to 4-bit compressed-tensors (codes packed into int32)."""
    out = tmp_path_factory.mktemp("quantized") / "w4"
    result = runner.invoke(app, ["quantize", str(tiny_llama_dir), "--bits", "4", "--mode", "per-group", "--group-size", "32", "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("hidden_size", 128, "with hidden_size = 128, the model's model.embed_tokens.weight is [30522, 128]"),
        ("num_hidden_layers", 3, "num_hidden_layers = 3, but the checkpoint holds no tensor of block model.layers.2"),
        # packed weights fix no shape, but no format packs a weight in less than a bit
        ("intermediate_size", 100_000, "tensors of model.layers.0.mlp.gate_proj hold 4,"),
    ],
)
def test_a_packed_checkpoint_is_held_against_its_config(quantized_llama: Path, tmp_path: Path, field: str, value: int, says: str) -> None:
    assert refused(str(quantized_llama)) is None
    bad = with_config(quantized_llama, tmp_path / "bad", lambda config: {**config, field: value})
    before = peak_rss()
    message = refused(str(bad), load=True)
    assert message is not None and says in message, message
    assert peak_rss() - before < MAX_GROWTH_BYTES
