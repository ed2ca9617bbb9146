"""Layer-by-layer calibration feeds each block exactly what the model would, and times only its own run."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

from squeeze.calib import pipeline
from squeeze.calib.pipeline import CalibrationClock, calibrate_sequentially, run_block_observed


def test_each_block_sees_the_models_hidden_states(tiny_llama_dir: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states
    seen: dict[str, torch.Tensor] = {}
    calibrate_sequentially(
        model,
        [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}],
        lambda name, block, inputs: seen.setdefault(name, torch.cat([h for h, _ in inputs])),
    )
    assert list(seen) == ["model.layers.0", "model.layers.1"]
    for index, name in enumerate(seen):
        assert torch.allclose(seen[name], expected[index], atol=1e-5)


def test_compressed_blocks_feed_the_next_block(tiny_bert_dir: Path) -> None:
    """What block i+1 receives is block i's output *after* block i was changed."""
    model = transformers.AutoModel.from_pretrained(tiny_bert_dir).eval()
    ids = torch.randint(1000, 2000, (1, 10), generator=torch.Generator().manual_seed(1))
    seen = {}

    def zero_out_first_block(name, block, inputs):
        seen[name] = inputs[0][0].clone()
        if name.endswith(".0"):
            for p in block.parameters():
                p.data.zero_()

    calibrate_sequentially(model, [{"input_ids": ids}], zero_out_first_block)
    # a BERT layer with all-zero weights returns LayerNorm(0 + input) with zero gain: all zeros
    assert torch.all(seen["encoder.layer.1"] == 0)
    assert not torch.all(seen["encoder.layer.0"] == 0)


class OneSecondClock(CalibrationClock):
    """Every timed span lasts exactly one second."""

    @contextmanager
    def timing(self) -> Iterator[None]:
        yield
        self.seconds += 1.0


def test_each_call_reports_its_own_seconds(tiny_llama_dir: Path, monkeypatch) -> None:
    """The seconds come from a clock made for the call (or handed in), never from module state:
    two calls do not add up, and a shared clock gives each call its own share."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    batches = [{"input_ids": torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))}]
    blocks = len(model.model.layers)
    monkeypatch.setattr(pipeline, "CalibrationClock", OneSecondClock)
    nothing = lambda name, block, inputs: None  # noqa: E731
    # the capture, then one output run per block
    assert calibrate_sequentially(model, batches, nothing) == 1 + blocks
    assert calibrate_sequentially(model, batches, nothing) == 1 + blocks
    assert not [name for name, value in vars(pipeline).items() if isinstance(value, CalibrationClock)]

    clock = OneSecondClock()
    observe = lambda name, block, inputs: run_block_observed(block, inputs, {}, lambda *_: None, clock=clock)  # noqa: E731
    assert calibrate_sequentially(model, batches, observe, clock=clock) == 1 + 2 * blocks
    assert calibrate_sequentially(model, batches, observe, clock=clock) == 1 + 2 * blocks
    assert clock.seconds == 2 * (1 + 2 * blocks)
