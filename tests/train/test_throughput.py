"""The live view of a run's work: model FLOPs as torch's own counter finds them, the useful share of a logged
window equal to one counted from the batch by hand, every figure in metrics.jsonl, TensorBoard and the summary,
and MFU left out with its reason where the device's peak is unknown."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mellow.distributed import DistributedContext
from mellow.files import read_jsonl
from mellow.model.decoders import load_tokenizer
from mellow.model.modeling import build_model
from mellow.settings import ModelConfig
from mellow.store.reader import EmbeddingStore
from mellow.train import loop
from mellow.train.batching import FixedBatches
from mellow.train.data import ExampleSet
from mellow.train.throughput import FlopModel, cuda_peak, device_peak, work_of

from conftest import TINY_MODEL, save_tiny_llama, train_config


def _unpadded_batch(rows: int = 3, tokens: int = 8, text: int = 20, dim: int = 80) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.full((rows, text), -100)
    input_ids = torch.randint(5, 100, (rows, text), generator=generator)
    labels[:, 10:] = input_ids[:, 10:]
    return {"audio1": torch.randn(rows, tokens, dim, generator=generator), "audio1_valid": torch.full((rows,), tokens),
            "audio2": torch.randn(rows, tokens, dim, generator=generator), "audio2_valid": torch.full((rows,), tokens),
            "has_audio2": torch.ones(rows, dtype=torch.bool), "input_ids": input_ids,
            "text_mask": torch.ones(rows, text, dtype=torch.long), "labels": labels}


@pytest.mark.parametrize("mode", ["full", "lora", "frozen"])
def test_model_flops_match_torchs_flop_counter(tmp_path, mode):
    """On a batch without padding, the estimate is what torch counts for a forward and backward pass (matmuls,
    attention), within 2%: the decoder body, LoRA adapters, the projector and the answer-only output projection."""
    model, _ = build_model(ModelConfig(decoder=f"hf:{save_tiny_llama(tmp_path / 'llama')}", decoder_mode=mode), 80, 0)
    batch = _unpadded_batch()
    with FlopCounterMode(display=False) as counter:
        model(batch).backward()
    work = work_of(model, FlopModel.of(model), batch)
    assert work.computed == work.useful == 3 * (2 + 16 + 20)
    assert work.flops == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_the_peak_comes_from_the_device_table_or_a_measured_matmul_or_is_named_missing():
    assert cuda_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert cuda_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert cuda_peak("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert cuda_peak("Some Future GPU", "bf16") is None
    peak, source = device_peak(torch.device("cpu"), "fp32")
    assert 1e9 < peak < 1e14 and "measured" in source
    assert device_peak(torch.device("meta"), "fp32") == (None, "MFU omitted: no peak FLOP/s known for meta devices")


def test_a_runs_metrics_tensorboard_and_summary_show_its_work(mel_store, tiny_dataset, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    config = train_config(mel_store, tiny_dataset, run_dir, max_updates=3, log_every=1, data_workers=0)
    loop.run(config, ModelConfig(**TINY_MODEL))
    rows = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]
    # the first update's batch, counted by hand: 2 separators, valid audio tokens, text; the rows are as long as
    # the longest (where a missing second audio takes one marker position); padding and markers are the rest
    store = EmbeddingStore(mel_store)
    examples = ExampleSet.from_split(tiny_dataset, "train", store, load_tokenizer("tiny"), 96, seed=5)
    _, first = next(FixedBatches(examples.lengths(), 4, 1, seed=5, bucket=1).stream(0, DistributedContext(0, 1, 0)))
    batch = examples.batch(first, epoch=0)
    texts = [len(examples.prompt_ids(i)) + len(examples.answer_ids(i)) for i in first]
    rows_by_hand = [2 + int(batch["audio1_valid"][row]) + text + (int(batch["audio2_valid"][row]) if
                    batch["has_audio2"][row] else 0) for row, text in enumerate(texts)]
    useful = sum(rows_by_hand)
    computed = 4 * max(length + (0 if batch["has_audio2"][row] else 1) for row, length in enumerate(rows_by_hand))
    assert useful < computed
    assert rows[0]["useful_share"] == pytest.approx(useful / computed)
    for row in rows:
        assert row["tokens_per_s"] * row["useful_share"] == pytest.approx(row["useful_tokens_per_s"])
        assert 0 < row["mfu"] < 1 and 0 <= row["data_wait"] < 1 and row["samples_per_s"] > 0
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for name in ("useful_share", "useful_tokens_per_s", "tokens_per_s", "data_wait", "mfu"):
        assert [event.step for event in events.Scalars(name)] == [1, 2, 3]
    summary = capsys.readouterr().out
    assert "compute:" in summary and "useful tok/s" in summary and "MFU" in summary


def test_the_summary_says_why_mfu_is_missing(tmp_path, capsys):
    result = loop.TrainResult(tmp_path, 3, 1.0, None, 2.0, rates={
        "samples_per_s": 10.0, "tokens_per_s": 400.0, "useful_tokens_per_s": 300.0, "useful_share": 0.75,
        "data_wait": 0.01}, peak_source="MFU omitted: no peak FLOP/s known for Some Future GPU")
    loop.report(result, train_config(tmp_path, tmp_path, tmp_path, max_updates=3))
    out = " ".join(capsys.readouterr().out.split())
    assert "useful tok/s (75% of computed)" in out and "MFU omitted: no peak FLOP/s known for Some Future GPU" in out


def test_useful_positions_leave_out_padding_invalid_audio_and_the_no_audio_block():
    model, _ = build_model(ModelConfig(**TINY_MODEL), 80, 0)
    batch = _unpadded_batch(rows=2, tokens=8, text=10)
    batch["audio1_valid"] = torch.tensor([8, 5])
    batch["has_audio2"] = torch.tensor([True, False])
    batch["text_mask"][1, 6:] = 0
    computed, lengths, audio = model.positions_of(batch)
    assert lengths.tolist() == [2 + 8 + 8 + 10, 2 + 5 + 6] and audio == 8 + 8 + 5
    assert np.array_equal(model.sequence_positions(np.array([10, 6]), 8, np.array([8, 5]), np.array([8, -1])),
                          [2 + 8 + 8 + 10, 2 + 5 + 1 + 6])  # the marker takes one position
    assert computed == 2 * max(28, 2 + 5 + 1 + 6)
