"""Model contracts: masked audio padding, the no-audio embedding, answer-only loss, and decoders that load."""

from __future__ import annotations

import pytest
import torch

from mellow.config import from_names
from mellow.model.modeling import build_model
from mellow.settings import ModelConfig, TrainConfig
from mellow.store.reader import EmbeddingStore
from mellow.train import loop
from mellow.train.checkpoint import load_trained_model
from mellow.train.data import ExampleSet, load_examples
from mellow.train.runs import find_checkpoint

from conftest import TINY_MODEL, save_tiny_llama


@pytest.fixture(scope="module")
def tiny(mel_store, tiny_dataset):
    store = EmbeddingStore(mel_store)
    model, tokenizer = build_model(ModelConfig(**TINY_MODEL, projector_dropout=0.0), store.dim, seed=0)
    examples = ExampleSet(load_examples(tiny_dataset, "train"), store, tokenizer, max_text_tokens=96)
    return model.eval(), examples


def _loss(model, batch) -> float:
    with torch.no_grad():
        return model(batch).item()


def test_padded_audio_tokens_are_not_attended(tiny):
    model, examples = tiny
    index = next(i for i in range(len(examples)) if examples.valid[examples.tokenized.row1[i]] < 4)
    batch = examples.batch([index])
    changed = {**batch, "audio1": batch["audio1"].clone()}
    changed["audio1"][0, int(batch["audio1_valid"][0]) :] = 100.0
    assert _loss(model, changed) == pytest.approx(_loss(model, batch), abs=1e-5)
    changed["audio1"][0, 0] = 100.0  # a valid token does matter
    assert _loss(model, changed) != pytest.approx(_loss(model, batch), abs=1e-3)


def test_single_audio_examples_use_the_learned_no_audio_embedding(tiny):
    model, examples = tiny
    index = next(i for i in range(len(examples)) if examples.tokenized.row2[i] < 0)
    batch = examples.batch([index])
    changed = {**batch, "audio2": torch.randn_like(batch["audio2"])}
    assert _loss(model, changed) == pytest.approx(_loss(model, batch), abs=1e-6)
    original = _loss(model, batch)
    with torch.no_grad():
        model.no_audio_embedding.add_(1.0)
    try:
        moved = _loss(model, batch)
    finally:
        with torch.no_grad():
            model.no_audio_embedding.sub_(1.0)
    assert moved != pytest.approx(original, abs=1e-4)  # the learned embedding is what fills the slot


def test_loss_is_on_answer_tokens_only_and_ignores_batch_padding(tiny):
    model, examples = tiny
    short = min(range(len(examples)), key=lambda i: len(examples.prompt_ids(i)))
    long = max(range(len(examples)), key=lambda i: examples.lengths()[i])
    alone = examples.batch([short])
    labels = alone["labels"][0]
    answer = examples.answer_ids(short)
    assert labels[labels != -100].tolist() == answer and answer[-1] == examples.tokenizer.eos_token_id
    together = examples.batch([short, long])
    with torch.no_grad():
        pair = model(together).item()
        single_long = model(examples.batch([long])).item()
    assert pair == pytest.approx((_loss(model, alone) + single_long) / 2, rel=1e-4)  # each example weighs 1
    model.loss_weighting = "token"
    try:
        n_short, n_long = len(answer), len(examples.answer_ids(long))
        expected = (_loss(model, alone) * n_short + single_long * n_long) / (n_short + n_long)
        assert _loss(model, together) == pytest.approx(expected, rel=1e-4)
    finally:
        model.loss_weighting = "example"


@pytest.fixture(scope="module")
def trained(mel_store, tiny_dataset, tmp_path_factory):
    """A tiny model trained for 60 updates: its answers depend on the prompt (an untrained one says the same
    thing to everything, which would make generation tests pass vacuously)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    loop.run(from_names(TrainConfig, store=mel_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=60,
                        batch_size=8,
                          lr=1e-2, warmup_updates=2, val_every=0, save_every=60), ModelConfig(**TINY_MODEL))
    model, tokenizer, _ = load_trained_model(find_checkpoint(run_dir), torch.device("cpu"))
    store = EmbeddingStore(mel_store)
    return model, ExampleSet(load_examples(tiny_dataset, "train"), store, tokenizer, max_text_tokens=96)


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_is_batch_invariant(trained, beams):
    """Left padding of the prompt and masked audio padding change nothing: each answer is the one the example
    gets alone, greedy and in beam search."""
    model, examples = trained
    eos = examples.tokenizer.eos_token_id
    indices = list(range(6))
    together = model.generate(examples.batch(indices, for_generation=True), 6, eos, num_beams=beams)
    alone = [model.generate(examples.batch([i], for_generation=True), 6, eos, num_beams=beams)[0] for i in indices]
    assert together == alone
    assert len({tuple(answer) for answer in together}) > 1  # the answers depend on the input


def test_local_decoder_folder_frozen_mode_saves_only_trainable_parts(mel_store, tiny_dataset, tmp_path):
    decoder_dir = save_tiny_llama(tmp_path / "decoder")
    model_config = ModelConfig(decoder=f"hf:{decoder_dir}", decoder_mode="frozen")
    run_dir = tmp_path / "run"
    loop.run(from_names(TrainConfig, store=mel_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=2,
                        batch_size=4,
                          val_every=0), model_config)
    checkpoint = find_checkpoint(run_dir)
    saved = torch.load(checkpoint / "model.pt")
    assert saved and not any(key.startswith("language_model.") for key in saved)
    model, _, _ = load_trained_model(checkpoint, torch.device("cpu"))
    assert torch.equal(model.audio_projector.linear1.weight, saved["audio_projector.linear1.weight"])


def test_bad_decoder_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown; use tiny, smollm2-135m, hf:<dir or org/name> or gguf:<file>"):
        ModelConfig(decoder="gpt-17")
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig(decoder=f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="cannot learn"):
        ModelConfig(decoder="tiny", decoder_mode="frozen")


def test_bundled_smollm2_converts_from_gguf_speaks_and_trains_frozen(mel_store, tiny_dataset):
    from mellow.model.decoders import load_decoder, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    language_model = load_decoder("smollm2-135m", tokenizer, (0, 0, 0)).eval()
    assert language_model.config.hidden_size == 576 and language_model.config.num_hidden_layers == 30
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = language_model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0])

    store = EmbeddingStore(mel_store)
    model, _ = build_model(ModelConfig(decoder="smollm2-135m", decoder_mode="frozen"), store.dim, seed=0)
    examples = ExampleSet(load_examples(tiny_dataset, "train"), store, tokenizer, max_text_tokens=64)
    loss = model(examples.batch([0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.audio_projector.linear1.weight.grad is not None
    assert all(p.grad is None for p in model.language_model.parameters())


def test_audio_scale_embeddings_makes_audio_tokens_as_large_as_text_tokens(tiny):
    _, examples = tiny
    batch = examples.batch([0, 1, 2])
    sizes = {}
    for scale in ("unit", "embeddings"):
        model, _ = build_model(ModelConfig(**TINY_MODEL, audio_scale=scale), batch["audio1"].shape[-1], seed=0)
        text_rms = model.language_model.get_input_embeddings().weight.pow(2).mean().sqrt().item()
        with torch.no_grad():
            audio_rms = model.eval().get_audio_features(batch["audio1"]).pow(2).mean().sqrt().item()
        sizes[scale] = (audio_rms, text_rms)
    assert sizes["unit"][0] == pytest.approx(1.0, rel=0.02)  # LayerNorm output, gain 1
    audio_rms, text_rms = sizes["embeddings"]
    assert text_rms < 0.1 and audio_rms == pytest.approx(text_rms, rel=0.02)
    with pytest.raises(ValueError, match="audio_scale 'big' must be unit or embeddings"):
        ModelConfig(audio_scale="big")


def test_chat_prompt_format_lays_the_example_out_as_the_decoders_chat_template(mel_store, tiny_dataset):
    store = EmbeddingStore(mel_store)
    model, tokenizer = build_model(ModelConfig(**TINY_MODEL, prompt_format="chat", projector_dropout=0.0), store.dim,
                                   seed=0)
    examples = ExampleSet(load_examples(tiny_dataset, "train"), store, tokenizer, max_text_tokens=96,
                          prompt_suffix=model.prompt_suffix)
    prompt_ids, answer_ids, example = examples.prompt_ids(0), examples.answer_ids(0), examples.examples[0]
    marker = "[audio]"
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": ""}, {"role": "user", "content": marker + example["prompt"]},
         {"role": "assistant", "content": example["answer"]}], tokenize=False)
    ours = tokenizer.decode(model.prefix_ids) + marker + tokenizer.decode(prompt_ids + answer_ids)
    assert ours.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n[audio]")
    assert rendered.startswith(ours) and ours.endswith(example["answer"] + "<|im_end|>")
    assert answer_ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")

    batch = examples.batch([0, 1])
    embeds, mask, positions, _ = model.build_inputs(batch)
    prefix = len(model.prefix_ids)
    assert torch.equal(embeds[0, :prefix], model.language_model.get_input_embeddings()(model.prefix_ids))
    assert mask[:, :prefix].all() and torch.equal(positions[:, :prefix], torch.arange(prefix).expand(2, -1))
    second = torch.where(batch["has_audio2"], batch["audio2_valid"], 1)  # a missing audio: one marker
    longest = prefix + batch["audio1_valid"] + second + 2 + batch["text_mask"].sum(dim=1)
    assert embeds.shape[1] == int(longest.max())
    loss = model(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.audio_projector.linear1.weight.grad is not None


def test_chat_prompt_format_needs_a_tokenizer_with_a_chat_template():
    from mellow.model.modeling import prompt_template

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="has no chat template; use plain"):
        prompt_template(NoTemplate(), "chat")
    assert prompt_template(NoTemplate(), "plain") == ([], "\n")
    with pytest.raises(ValueError, match="prompt_format 'json' must be plain or chat"):
        ModelConfig(prompt_format="json")
