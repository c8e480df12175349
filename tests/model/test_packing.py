"""Packing (--train.packing on): several examples share a row, and the decoder must see each alone. The
per-example losses and the gradients of a packed batch equal the unpacked batch's (fp32, 1e-5) for the tiny
decoder, a SmolLM2-shaped one and a LoRA decoder; what evaluation computes (ranking, generation) is what the
packed training optimised; a decoder whose attention would cross examples is refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from mellow.model.decoders import load_tokenizer
from mellow.model.modeling import PackingUnsupportedError, build_model, check_packing
from mellow.settings import ModelConfig
from mellow.store.reader import EmbeddingStore
from mellow.train.data import ExampleSet, load_examples

from conftest import TINY_MODEL


def _save(model, folder):
    model.save_pretrained(folder)
    load_tokenizer("tiny").save_pretrained(folder)
    return f"hf:{folder}"


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory) -> str:
    """SmolLM2-135M's shape (width 576, 9 heads sharing 3 key/value heads, rope theta 1e5, tied embeddings), two of
    its 30 layers, randomly initialised and saved as a user's decoder folder."""
    tokenizer = load_tokenizer("tiny")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, max_position_embeddings=8192,
                         eos_token_id=tokenizer.eos_token_id)
    return _save(LlamaForCausalLM(config), tmp_path_factory.mktemp("smollm2-shaped"))


@pytest.fixture(scope="module")
def examples(mel_store, tiny_dataset):
    store = EmbeddingStore(mel_store)
    _, tokenizer = build_model(ModelConfig(**TINY_MODEL), store.dim, seed=0)
    return ExampleSet(load_examples(tiny_dataset, "train"), store, tokenizer, max_text_tokens=96), store


def _per_example_losses(model, batch) -> torch.Tensor:
    token_losses, example_of_token, scored = model.answer_token_losses(batch)
    return torch.zeros(scored.shape[0]).index_add_(0, example_of_token, token_losses)


def _losses_and_gradients(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    losses = _per_example_losses(model, batch)
    (losses * torch.linspace(0.5, 1.5, len(losses))).sum().backward()  # every example's gradient counts apart
    return losses.detach(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                             if parameter.grad is not None}


@pytest.mark.parametrize("decoder", ["tiny", "smollm2-shaped", "lora"])
def test_a_packed_batch_gives_each_example_the_losses_and_gradients_it_has_alone(examples, smollm2_shaped,
                                                                                 decoder):
    example_set, store = examples
    settings = {"tiny": dict(TINY_MODEL), "smollm2-shaped": dict(decoder=smollm2_shaped),
                "lora": dict(decoder=smollm2_shaped, decoder_mode="lora", lora_dropout=0.0)}[decoder]
    model, _ = build_model(ModelConfig(**settings, projector_dropout=0.0), store.dim, seed=0)
    model.train()  # no dropout anywhere (projector and LoRA dropout 0): training's code path, deterministic
    row2 = example_set.tokenized.row2
    pairs, singles = [i for i in range(len(example_set)) if row2[i] >= 0], [i for i in range(len(example_set))
                                                                             if row2[i] < 0]
    chosen = [singles[0], pairs[0], singles[1], pairs[1], pairs[2], singles[2], pairs[3], singles[3], singles[4]]
    batch = example_set.batch(chosen)
    packed = example_set.batch(chosen, rows=[0, 0, 0, 1, 1, 2, 2, 2, 2])  # rows of 3, 2 and 4 examples
    alone, alone_gradients = _losses_and_gradients(model, batch)
    together, packed_gradients = _losses_and_gradients(model, packed)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert alone_gradients.keys() == packed_gradients.keys() and alone_gradients
    for name, gradient in alone_gradients.items():
        torch.testing.assert_close(packed_gradients[name], gradient, rtol=1e-5, atol=1e-5, msg=name)
    # the rows really are shared: 3 rows computed, fewer positions than 9 padded rows
    assert model.build_inputs(packed)[0].shape[0] == 3
    assert model.positions_of(packed)[0] < model.positions_of(batch)[0]


def test_what_evaluation_scores_is_what_packed_training_optimised(examples):
    """--closed rank scores an answer by its log-likelihood and generation continues the same positions: both
    run on unpacked rows and agree with the packed training forward."""
    example_set, store = examples
    model, _ = build_model(ModelConfig(**TINY_MODEL, projector_dropout=0.0), store.dim, seed=0)
    model.eval()
    chosen = list(range(6))
    packed = example_set.batch(chosen, rows=[0, 0, 1, 1, 1, 1])
    with torch.no_grad():
        trained = -_per_example_losses(model, packed)
    torch.testing.assert_close(model.answer_log_likelihood(example_set.batch(chosen)), trained, rtol=1e-5,
                               atol=1e-5)
    # generation's first token is the argmax of the packed forward at each example's first answer position
    first = [int(example_set.answer_ids(i)[0]) for i in chosen]
    generated = model.generate(example_set.batch(chosen, for_generation=True), max_new_tokens=1,
                               eos_token_id=-1)
    with torch.no_grad():
        embeds, _, positions, text_at = model.build_inputs(packed)
        hidden = model.language_model.base_model(inputs_embeds=embeds, position_ids=positions,
                                                 use_cache=False).last_hidden_state.reshape(-1, embeds.shape[-1])
        prompt_ends = [len(example_set.prompt_ids(i)) - 1 for i in chosen]
        states = hidden[text_at[torch.arange(len(chosen)), prompt_ends]]
        predicted = model.language_model.get_output_embeddings()(states).argmax(dim=-1).tolist()
    assert [row[0] for row in generated] == predicted
    assert first  # the examples have answers


def test_a_decoder_whose_attention_crosses_packed_examples_is_refused_by_name(examples, tmp_path):
    _, store = examples
    tokenizer = load_tokenizer("tiny")
    opt = _save(OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                         num_attention_heads=2, word_embed_proj_dim=32,
                                         eos_token_id=tokenizer.eos_token_id)), tmp_path / "opt")
    model, _ = build_model(ModelConfig(decoder=opt), store.dim, seed=0)
    refused = (r"--train.packing on: the decoder hf:.*opt \(OPTForCausalLM, attention 'sdpa'\) lets attention cross "
               r".* use --train.packing off")
    with pytest.raises(PackingUnsupportedError, match=refused):
        check_packing(model, opt)
    llama, _ = build_model(ModelConfig(**TINY_MODEL), store.dim, seed=0)
    check_packing(llama, "tiny")  # keeps attention within examples: no error
