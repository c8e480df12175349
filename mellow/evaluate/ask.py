"""`mellow ask`: a trained checkpoint answers a prompt about one or two audio files.

The files are decoded by ffmpeg and encoded on the fly by the encoder the checkpoint's store was made with,
with the same preprocessing (clip length, crop, the first of its views, token pooling); the encoder found now
must have the fingerprint the store recorded, so the model sees audio exactly as it did in training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mellow.audio.views import decode_views
from mellow.config import describe_differences
from mellow.distributed import resolve_device
from mellow.encode.encoders import AudioEncoder, build_encoder
from mellow.files import read_json
from mellow.progress import console
from mellow.settings import AskConfig, EncoderConfig, encoder_settings
from mellow.store.writer import StoreMismatchError
from mellow.train.checkpoint import load_trained_model
from mellow.train.runs import find_checkpoint


def encoder_of_store(fingerprint: dict, device: str) -> AudioEncoder:
    """The encoder that made a store of `fingerprint`, rebuilt here; refused if its weights or settings differ."""
    config = EncoderConfig(**encoder_settings(fingerprint), device=device, batch_size=2)
    encoder = build_encoder(config)
    differences = describe_differences({"views": 1, **fingerprint}, encoder.fingerprint())
    if differences:
        raise StoreMismatchError("the encoder found now is not the one the checkpoint's store was made with:\n  "
                                 + "\n  ".join(differences))
    return encoder


def encode_files(encoder: AudioEncoder, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (N, T, D) float32 and valid token counts (N,) of the first view the store would keep of each
    file. Unreadable, empty or silent files raise AudioDecodeError naming the file."""
    decoded = [decode_views({"path": str(path)}, str(path), encoder.config, 0.0, encoder.sample_rate)[0]
               for path in paths]
    waves, fractions = zip(*decoded)
    embeddings, valid = encoder.encode(np.stack(waves), np.array(fractions))
    return torch.from_numpy(embeddings).float(), torch.from_numpy(valid.astype(np.int64))


def prompt_ids(tokenizer, prompt: str, prompt_suffix: str) -> list[int]:
    """The prompt's token ids as the token cache makes them: the prompt, then the model's prompt suffix (a newline,
    or the chat template's end of the user turn), without special tokens."""
    return tokenizer(prompt + prompt_suffix, add_special_tokens=False)["input_ids"]


def generation_batch(pad_token_id: int, items: list[tuple[torch.Tensor, torch.Tensor, list[int]]]
                     ) -> dict[str, torch.Tensor]:
    """A generation batch of (audio (1 or 2, T, D), valid token counts (1 or 2,), prompt ids) items, built as
    ExampleSet.batch builds one: prompts left-padded, so every row ends where decoding starts; an item with one
    audio has no second."""
    width = max(len(ids) for _, _, ids in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    text_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (_, _, ids) in enumerate(items):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        text_mask[row, width - len(ids):] = 1
    first = [audio[:1] for audio, _, _ in items]
    second = [audio[1:2] if audio.shape[0] == 2 else torch.zeros_like(audio[:1]) for audio, _, _ in items]
    return {"audio1": torch.cat(first), "audio1_valid": torch.cat([valid[:1] for _, valid, _ in items]),
            "audio2": torch.cat(second),
            "audio2_valid": torch.cat([valid[1:2] if len(valid) == 2 else torch.zeros_like(valid[:1])
                                       for _, valid, _ in items]),
            "has_audio2": torch.tensor([audio.shape[0] == 2 for audio, _, _ in items]), "input_ids": input_ids,
            "text_mask": text_mask}


def ask(config: AskConfig, audio_files: list[Path], prompt: str) -> str:
    """The checkpoint's answer to `prompt` about one or two audio files."""
    if not 1 <= len(audio_files) <= 2:
        raise ValueError(f"give one or two audio files before the prompt, not {len(audio_files)}")
    for path in audio_files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such audio file")
    if not prompt.strip():
        raise ValueError("the prompt is empty; ask something, e.g. \"Describe the audio.\"")
    device = torch.device(resolve_device(config.device))
    if config.model is not None:
        from mellow.evaluate.export import exported_encoder, load_exported_model

        fingerprint = exported_encoder(config.model)
    else:
        checkpoint = find_checkpoint(config.checkpoint, config.which)
        fingerprint = read_json(checkpoint / "trainer.json")["store_fingerprint"]
    # the encoder and the audio first: a mismatch or a bad file is refused before the decoder is loaded
    encoder = encoder_of_store(fingerprint, str(device))
    audio, valid = encode_files(encoder, audio_files)
    if config.model is not None:
        model, tokenizer = load_exported_model(config.model, device)
        described = f"{config.model} (exported)"
    else:
        model, tokenizer, trainer = load_trained_model(checkpoint, device)
        described = f"{checkpoint} (update {trainer['update']})"
    items = [(audio, valid, prompt_ids(tokenizer, prompt, model.prompt_suffix))]
    batch = {key: value.to(device) for key, value in generation_batch(tokenizer.pad_token_id, items).items()}
    tokens = model.generate(batch, config.max_new_tokens, tokenizer.eos_token_id, num_beams=config.beams)[0]
    console.print(f"[dim]{described}, {encoder.config.name}, "
                  f"{'greedy' if config.beams == 1 else f'beam {config.beams}'}[/]", highlight=False)
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()

