"""Decoders: tiny randomly initialised Llama, GPT-2 and Qwen2 folders saved with `save_pretrained` (with
tokenizers that have, or lack, a chat template, a padding and an end-of-sequence token), and a GGUF file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mellow.files import hash_model_weights
from mellow.model.decoders import SMOLLM2_GGUF, _smollm2_gguf_dir, decoder_folder, gguf_dir, load_tokenizer, smollm2_dir
from mellow.model.modeling import build_model
from mellow.settings import ModelConfig
from mellow.store.reader import EmbeddingStore
from mellow.train.data import ExampleSet, load_examples

from conftest import save_tiny_llama


def word_tokenizer(dataset: Path):
    """A word-level tokenizer of the dataset's words with no special tokens at all: no end-of-sequence, no
    padding, no chat template (as some older or home-made tokenizers are)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for split in ("train", "val", "test") for example in load_examples(dataset, split)
                    for word in f"{example['prompt']} {example['answer']}".lower().replace("?", " ? ").split()})
    vocabulary = {word: index for index, word in enumerate(["[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def save_decoder(family: str, folder: Path, dataset: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        return save_tiny_llama(folder)  # SmolLM2's tokenizer: chat template, padding and end-of-sequence tokens
    if family == "gpt2":
        tokenizer = word_tokenizer(dataset)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                   n_positions=256)).save_pretrained(folder)
    else:
        tokenizer = load_tokenizer("tiny")  # ChatML template, as Qwen2's
        Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                     eos_token_id=tokenizer.eos_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family, prompt_format", [("llama", "chat"), ("gpt2", "plain"), ("qwen2", "chat")])
def test_causal_lm_families_train_and_generate_batch_invariantly(family, prompt_format, mel_store, tiny_dataset,
                                                                  tmp_path):
    folder = save_decoder(family, tmp_path / family, tiny_dataset)
    store = EmbeddingStore(mel_store)
    model, tokenizer = build_model(ModelConfig(decoder=f"hf:{folder}", prompt_format=prompt_format,
                                               projector_dropout=0.0), store.dim, seed=0)
    examples = ExampleSet(load_examples(tiny_dataset, "train"), store, tokenizer, max_text_tokens=64)
    batch = examples.batch(list(range(8)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::8]  # it learns these 8 answers, end-of-sequence included
    model.eval()
    eos = tokenizer.eos_token_id
    together = model.generate(examples.batch(list(range(8)), for_generation=True), 12, eos)
    alone = [model.generate(examples.batch([i], for_generation=True), 12, eos)[0] for i in range(8)]
    assert together == alone  # left padding of the prompts and masked audio padding change nothing
    assert sum(len(answer) < 12 for answer in together) >= 4  # it learned to stop


def test_a_tokenizer_without_special_tokens_gets_them_safely(tiny_dataset, tmp_path):
    """No end-of-sequence token: one is added and the embeddings grow by a row at the mean of the others
    (transformers' mean_resizing), so the new token's logit starts like an average token's instead of taking over
    generation; no padding token: padding uses end-of-sequence."""
    folder = save_decoder("gpt2", tmp_path / "gpt2", tiny_dataset)
    tokenizer = load_tokenizer(f"hf:{folder}")
    plain = word_tokenizer(tiny_dataset)
    assert plain.eos_token_id is None and plain.pad_token_id is None
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == len(plain)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    model, _ = build_model(ModelConfig(decoder=f"hf:{folder}"), 80, seed=0)
    rows = model.language_model.get_input_embeddings().weight.detach()
    assert rows.shape[0] == len(plain) + 1
    assert torch.isfinite(rows[-1]).all()
    assert (rows[-1] - rows[:-1].mean(dim=0)).norm() < 0.1 * rows[:-1].norm(dim=1).mean()


@pytest.mark.slow
def test_a_gguf_file_converts_once_like_the_bundled_decoder():
    """`gguf:<file>` goes through the same conversion as smollm2-135m: the bundled file gives the same weights."""
    gguf_file = _smollm2_gguf_dir() / SMOLLM2_GGUF
    folder = gguf_dir(gguf_file)
    assert decoder_folder(f"gguf:{gguf_file}") == folder and (folder / ".complete").exists()
    assert hash_model_weights(folder) == hash_model_weights(smollm2_dir())
    tokenizer = load_tokenizer(f"gguf:{gguf_file}")
    assert tokenizer.chat_template and tokenizer("hello")["input_ids"] == load_tokenizer("smollm2-135m")("hello")[
        "input_ids"]


def test_bad_decoder_names_say_what_to_pass(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no such file"):
        ModelConfig(decoder=f"gguf:{tmp_path / 'model.gguf'}")
    with pytest.raises(ValueError, match="neither a folder nor a Hugging Face id"):
        ModelConfig(decoder="hf:./not/a/folder/here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        decoder_folder("hf:someone/not-cached-model")
