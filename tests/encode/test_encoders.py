"""Encoders from local folders and the Hugging Face cache: tiny randomly initialised CLAP, Whisper, AST,
wav2vec2, HuBERT and WavLM models saved with `save_pretrained`, loaded by the real code, their outputs checked
against transformers' own APIs; output and pooling options reach the store's fingerprint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from mellow.encode.encoders import build_encoder
from mellow.files import read_json
from mellow.settings import EncoderConfig

CLIP_SECONDS = 1.5
WAV2VEC_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8),
                     num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)


def save_tiny(family: str, folder: Path) -> Path:
    """A tiny random model of `family` saved as a user's model folder (config.json + safetensors)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "clap":
        audio = tf.ClapAudioConfig(depths=[1, 1], num_attention_heads=[2, 2], hidden_size=32,
                                   patch_embeds_hidden_size=16, projection_dim=16, spec_size=256, window_size=8)
        text = tf.ClapTextConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, projection_dim=16)
        model = tf.ClapModel(tf.ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(),
                                           projection_dim=16))
    elif family == "whisper":
        model = tf.WhisperModel(tf.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1,
                                                 encoder_attention_heads=2, decoder_attention_heads=2,
                                                 encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                                                 pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                 decoder_start_token_id=1))
    elif family == "ast":
        model = tf.ASTModel(tf.ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, num_mel_bins=32, max_length=200, patch_size=16,
                                         frequency_stride=8, time_stride=10))
    else:
        config_class = {"wav2vec2": tf.Wav2Vec2Config, "hubert": tf.HubertConfig, "wavlm": tf.WavLMConfig}[family]
        model = tf.AutoModel.from_config(config_class(**WAV2VEC_SHAPE))
    model.save_pretrained(folder)
    return folder


def waves(sample_rate: int, count: int = 2) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 0.1, (count, int(CLIP_SECONDS * sample_rate))).astype(np.float32)


@pytest.mark.parametrize("family, dim", [("clap", 32), ("whisper", 32), ("ast", 32), ("wav2vec2", 32),
                                         ("hubert", 32), ("wavlm", 32)])
def test_every_family_encodes_to_tokens(family, dim, tmp_path):
    encoder = build_encoder(EncoderConfig(name=f"hf:{save_tiny(family, tmp_path)}", clip_seconds=CLIP_SECONDS,
                                          tokens=3))
    embeddings, valid = encoder.encode(waves(encoder.sample_rate), np.array([1.0, 0.5]))
    assert embeddings.shape == (2, 3, dim) and embeddings.dtype == np.float16 and valid.tolist() == [3, 2]
    assert np.isfinite(embeddings.astype(np.float32)).all() and embeddings.astype(np.float32).std() > 0
    assert embeddings[0].tolist() != embeddings[1].tolist()


@pytest.mark.parametrize("family", ["whisper", "wav2vec2", "hubert", "wavlm"])
def test_a_chosen_layer_is_that_hidden_state_of_the_model(family, tmp_path):
    """--output layer:1 stores transformers' hidden_states[1] (for Whisper: the frames the clip covers)."""
    from transformers import AutoModel, WhisperFeatureExtractor, WhisperModel

    folder = save_tiny(family, tmp_path)
    encoder = build_encoder(EncoderConfig(name=f"hf:{folder}", clip_seconds=CLIP_SECONDS, tokens=3,
                                          output="layer:1"))
    audio = waves(encoder.sample_rate)
    if family == "whisper":
        model, extractor = WhisperModel.from_pretrained(folder).get_encoder(), WhisperFeatureExtractor(feature_size=80)
        inputs = {"input_features": extractor(list(audio), sampling_rate=16000, return_tensors="pt").input_features}
    else:
        model = AutoModel.from_pretrained(folder)
        inputs = {"input_values": torch.from_numpy((audio - audio.mean(1, keepdims=True))
                                                   / np.sqrt(audio.var(1, keepdims=True) + 1e-7))}
    with torch.no_grad():
        expected = model(**inputs, output_hidden_states=True).hidden_states[1]
    if family == "whisper":
        expected = expected[:, :int(np.ceil(CLIP_SECONDS * expected.shape[1] / 30.0))]
    torch.testing.assert_close(encoder.frames(audio), expected, atol=1e-5, rtol=1e-4)
    last = build_encoder(EncoderConfig(name=f"hf:{folder}", clip_seconds=CLIP_SECONDS, tokens=3))
    assert not torch.allclose(last.frames(audio), encoder.frames(audio))
    with pytest.raises(ValueError, match="has hidden states 0 to 2"):
        build_encoder(EncoderConfig(name=f"hf:{folder}", clip_seconds=CLIP_SECONDS, tokens=3, output="layer:7"))


def test_pooled_outputs_are_the_models_own_clip_embeddings(tmp_path):
    """CLAP: ClapModel.get_audio_features (projected, normalised); AST: the pooler output."""
    from transformers import ASTFeatureExtractor, ASTModel, ClapFeatureExtractor, ClapModel

    clap_dir, ast_dir = save_tiny("clap", tmp_path / "clap"), save_tiny("ast", tmp_path / "ast")
    clap = build_encoder(EncoderConfig(name=f"hf:{clap_dir}", clip_seconds=CLIP_SECONDS, tokens=1, output="pooled"))
    audio = waves(clap.sample_rate)
    features = ClapFeatureExtractor(truncation="rand_trunc")(list(audio), sampling_rate=48000, return_tensors="pt")
    with torch.no_grad():
        expected = ClapModel.from_pretrained(clap_dir).get_audio_features(**features).pooler_output
    embeddings, _ = clap.encode(audio, np.ones(2))
    assert embeddings.shape == (2, 1, 16)
    torch.testing.assert_close(torch.from_numpy(embeddings[:, 0]).float(), expected, atol=2e-3, rtol=2e-3)

    ast = build_encoder(EncoderConfig(name=f"hf:{ast_dir}", clip_seconds=CLIP_SECONDS, tokens=1, output="pooled"))
    audio = waves(ast.sample_rate)
    features = ASTFeatureExtractor(num_mel_bins=32, max_length=200)(list(audio), sampling_rate=16000,
                                                                    return_tensors="pt")
    with torch.no_grad():
        expected = ASTModel.from_pretrained(ast_dir)(**features).pooler_output
    torch.testing.assert_close(ast.frames(audio)[:, 0], expected, atol=1e-5, rtol=1e-4)
    # AST's last hidden state: patch tokens averaged over frequency, only the time steps 1.5 s of 2 s covers
    frames = build_encoder(EncoderConfig(name=f"hf:{ast_dir}", clip_seconds=CLIP_SECONDS, tokens=3)).frames(audio)
    assert frames.shape == (2, 15, 32)  # time grid (200 - 16) // 10 + 1 = 19 steps; 75% of them, rounded up


def test_output_options_are_validated_and_enter_the_fingerprint(tmp_path):
    folder = save_tiny("wav2vec2", tmp_path)
    with pytest.raises(ValueError, match="use --tokens 1"):
        EncoderConfig(name=f"hf:{folder}", output="pooled", tokens=4)
    with pytest.raises(ValueError, match="must be last, pooled or layer:<N>"):
        EncoderConfig(name=f"hf:{folder}", output="layer-3")
    with pytest.raises(ValueError, match="only hf: encoders"):
        EncoderConfig(name="mel", output="layer:1")
    with pytest.raises(ValueError, match="must be average or max"):
        EncoderConfig(name="mel", pooling="median")
    with pytest.raises(ValueError, match="stage to stage"):
        build_encoder(EncoderConfig(name=f"hf:{save_tiny('clap', tmp_path / 'clap')}", output="layer:1"))
    default = build_encoder(EncoderConfig(name=f"hf:{folder}", clip_seconds=CLIP_SECONDS))
    layer = build_encoder(EncoderConfig(name=f"hf:{folder}", clip_seconds=CLIP_SECONDS, output="layer:1",
                                        pooling="max"))
    assert "output" not in default.fingerprint() and default.fingerprint()["pooling"] == "adaptive-average"
    assert layer.fingerprint()["output"] == "layer:1" and layer.fingerprint()["pooling"] == "adaptive-max"
    assert default.tag() != layer.tag() and "-layer1-max-" in layer.tag()


@pytest.mark.slow
def test_precompute_with_a_local_folder_and_through_the_hf_cache(tiny_dataset, tmp_path):
    """`--encoder hf:<folder>` and `--encoder hf:<org/name>` from an HF cache (HF_HUB_OFFLINE=1, in a process
    started with that environment, as a user's would be) give the same store; the store opens with stock zarr;
    a model missing from the cache is a clear error offline."""
    folder = save_tiny("hubert", tmp_path / "hubert")
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-hubert"
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    environment = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    options = ["--clip-seconds", "3", "--tokens", "4", "--output", "layer:2", "--pooling", "max",
               "--shard-clips", "12"]

    def precompute(name: str, root: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mellow.cli", "precompute", str(tiny_dataset), "--encoder",
                               name, *options, "--store-root", str(root)], env=environment, capture_output=True,
                              text=True, timeout=600)

    stores = []
    for name, root in ((f"hf:{folder}", tmp_path / "local"), ("hf:someone/tiny-hubert", tmp_path / "cached")):
        completed = precompute(name, root)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        stores.extend((root / tiny_dataset.name).iterdir())
    local, cached = (zarr.open_group(store / "store.zarr", mode="r")["emb"][:] for store in stores)
    assert local.shape == (24, 4, 32) and np.array_equal(local, cached)
    meta = read_json(stores[1] / "meta.json")
    assert meta["fingerprint"]["output"] == "layer:2" and meta["fingerprint"]["pooling"] == "adaptive-max"
    completed = precompute("hf:someone/absent-model", tmp_path / "absent")
    assert completed.returncode == 2 and "HF_HUB_OFFLINE" in completed.stdout and "hf download" in completed.stdout
