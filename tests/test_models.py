"""squeeze.models: resolving inputs, loading, saving, atomic output folders, inspect."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.models import (
    ModelSource,
    atomic_output_dir,
    check_output_dir,
    inspect_model,
    load_model,
    resolve_model,
    save_model,
)


@pytest.fixture
def llama_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny Llama folder that a test may damage."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "llama"))


# --- resolve and load ------------------------------------------------------------------------


def test_load_local_causal(tiny_llama_dir: Path) -> None:
    source = resolve_model(str(tiny_llama_dir))
    assert source.kind == "causal"
    assert source.path == tiny_llama_dir
    loaded = load_model(source)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token is not None
    ids = loaded.tokenizer(["hello world"], return_tensors="pt").input_ids
    logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], loaded.config.vocab_size)


def test_load_local_encoder_in_bf16(tiny_bert_dir: Path) -> None:
    loaded = load_model(str(tiny_bert_dir), dtype=torch.bfloat16)
    assert loaded.source.kind == "encoder"
    assert type(loaded.model).__name__ == "BertModel"
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    batch = loaded.tokenizer(["a short sentence", "two"], return_tensors="pt", padding=True)
    hidden = loaded.model(**batch).last_hidden_state
    assert hidden.shape[:2] == batch.input_ids.shape and hidden.shape[2] == 64


def test_save_and_reload_round_trip(tiny_llama_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_llama_dir))
    save_model(loaded.model, loaded.tokenizer, tmp_path / "saved")
    again = load_model(str(tmp_path / "saved"))
    ids = torch.tensor([[101, 7592, 2088, 102]])
    assert torch.equal(loaded.model(ids).logits, again.model(ids).logits)


def test_unavailable_cuda_is_a_user_error(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SqueezeError, match="CUDA is not available"):
        load_model(str(tiny_llama_dir), device="cuda")
    assert load_model(str(tiny_llama_dir), device="auto").model.device.type == "cpu"


# --- bad inputs ------------------------------------------------------------------------------


def test_missing_path() -> None:
    with pytest.raises(SqueezeError, match=r"model path \./no-such-model does not exist"):
        resolve_model("./no-such-model")


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(SqueezeError, match="cannot download squeeze-test-org/no-such-model") as info:
        resolve_model("squeeze-test-org/no-such-model")
    assert time.monotonic() - start < 10
    assert "\n" not in str(info.value)


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(SqueezeError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_folder_with_only_pickles(llama_copy: Path) -> None:
    (llama_copy / "model.safetensors").rename(llama_copy / "pytorch_model.bin")
    with pytest.raises(SqueezeError, match=r"no \*\.safetensors.*pytorch_model\.bin.*never loaded"):
        resolve_model(str(llama_copy))


def test_truncated_safetensors(llama_copy: Path) -> None:
    weights = llama_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1000])
    with pytest.raises(SqueezeError, match="model.safetensors is truncated or corrupt"):
        resolve_model(str(llama_copy))


def test_corrupt_safetensors_header(llama_copy: Path) -> None:
    weights = llama_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + header_len] = b"#" * header_len  # same size, not JSON
    weights.write_bytes(bytes(data))
    with pytest.raises(SqueezeError, match="header is not valid JSON"):
        resolve_model(str(llama_copy))


def test_safetensors_header_length_beyond_file(llama_copy: Path) -> None:
    weights = llama_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(SqueezeError, match="truncated or corrupt: header claims"):
        resolve_model(str(llama_copy))


def test_index_with_missing_shard(llama_copy: Path) -> None:
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SqueezeError, match="missing shard model-00002-of-00002.safetensors"):
        resolve_model(str(llama_copy))


def test_index_naming_a_tensor_its_shard_does_not_hold(llama_copy: Path) -> None:
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors", "model.nowhere.weight": "model.safetensors"}}
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SqueezeError, match="puts tensor model.nowhere.weight in model.safetensors, which does not hold it"):
        resolve_model(str(llama_copy))


def test_garbage_gguf(tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"\x00" * 1024)
    with pytest.raises(SqueezeError, match="not a GGUF file"):
        resolve_model(str(not_gguf))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x01\x02")
    with pytest.raises(SqueezeError, match="truncated.gguf is truncated or corrupt"):
        resolve_model(str(truncated))


def test_unsupported_architecture(llama_copy: Path) -> None:
    config = json.loads((llama_copy / "config.json").read_text())
    config.update(model_type="t5", architectures=["T5ForConditionalGeneration"])
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(SqueezeError, match="model_type 't5'.*does not support"):
        resolve_model(str(llama_copy))


def test_text_encoder_decoders_resolve_as_seq2seq_and_others_are_refused(llama_copy: Path) -> None:
    config = json.loads((llama_copy / "config.json").read_text())
    config.update(model_type="bart", architectures=["BartForConditionalGeneration"], is_encoder_decoder=True)
    (llama_copy / "config.json").write_text(json.dumps(config))
    assert resolve_model(str(llama_copy)).kind == "seq2seq"
    config.update(model_type="whisper", architectures=["WhisperForConditionalGeneration"])
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(SqueezeError, match="model_type 'whisper'.*not a text-to-text model"):
        resolve_model(str(llama_copy))


# --- output directories ----------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_atomic_output_dir_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_output_dir(out) as staging:
        assert staging.parent == tmp_path and staging != out and not out.exists()
        (staging / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("interruption", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path: Path, interruption: BaseException) -> None:
    out = tmp_path / "out"
    with pytest.raises(type(interruption)):
        with atomic_output_dir(out) as staging:
            (staging / "half.txt").write_text("half")
            raise interruption
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_existing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SqueezeError, match="already exists; pass --overwrite"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(SqueezeError, match="already exists"):
        check_output_dir(out, overwrite=False)
    assert _leftovers(tmp_path) == []


def test_atomic_output_dir_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_failed_overwrite_keeps_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, overwrite=True):
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert _leftovers(tmp_path) == []


def test_check_output_dir_file_and_unwritable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SqueezeError, match="is a file"):
        check_output_dir(a_file, overwrite=True)
    check_output_dir(tmp_path / "new" / "nested", overwrite=False)  # missing parents are fine
    locked = tmp_path / "locked"
    locked.mkdir()
    # tests run as root here, who may write anywhere: the permission answer is what is under test
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(SqueezeError, match="not writable"):
        check_output_dir(locked / "out", overwrite=False)


# --- inspect ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_bert_dir"])
def test_inspect_counts_match_the_loaded_model(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    info = inspect_model(str(folder))
    model = load_model(str(folder)).model
    total = sum(p.numel() for p in model.parameters())
    assert info["params_total"] == total
    assert info["bytes_fp32"] == 4 * total
    assert info["bytes_bf16"] == 2 * total
    block_linears = [
        m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer" in n and "lm_head" not in n
    ]
    assert info["params_quantizable"] == sum(m.weight.numel() for m in block_linears)
    other = total - info["params_quantizable"]
    assert info["bytes_int8"] == info["params_quantizable"] + 2 * other
    assert info["bytes_int4"] == info["params_quantizable"] // 2 + 2 * other
    assert info["layers"] == 2 and info["hidden_size"] == 64
    assert 0 < info["params_embedding"] < total


def test_inspect_llama_architecture(tiny_llama_dir: Path) -> None:
    info = inspect_model(ModelSource(str(tiny_llama_dir), tiny_llama_dir, "causal", "tiny"))
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["model_type"] == "llama" and info["kind"] == "causal"
    # 2 blocks × (q, k, v, o, gate, up, down); k and v are 64 × 32 with 2 of 4 heads
    assert info["params_quantizable"] == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)


# --- the real built-in model -----------------------------------------------------------------


@pytest.mark.real_model
def test_builtin_smollm2_loads_from_cache() -> None:
    source = resolve_model("smollm2")  # converts once into the cache, then reuses it
    assert source.kind == "causal" and (source.path / "model.safetensors").is_file()
    loaded = load_model(source)
    assert loaded.config.num_hidden_layers == 30
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    next_token = loaded.model(ids).logits[0, -1].argmax()
    assert loaded.tokenizer.decode(next_token).strip() == "Paris"


# --- the package's face ----------------------------------------------------------------------


def test_the_package_exports_what_passes_import() -> None:
    import squeeze.models

    used = {
        "BUILTIN_MODELS", "LoadedModel", "ModelSource", "atomic_output_dir", "check_output_dir", "inspect_model",
        "is_quantized_folder", "is_sparse_folder", "load_model", "load_tokenizer", "meta_model", "publish_dir",
        "resolve_model", "save_model", "stored_dtype",
    }
    assert used <= set(squeeze.models.__all__)
    assert all(hasattr(squeeze.models, name) for name in squeeze.models.__all__)
