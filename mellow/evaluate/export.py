"""`mellow export`: a trained checkpoint as a self-contained model folder.

    <out>/decoder/               the decoder (LoRA adapters merged in) and its tokenizer, by save_pretrained:
                                 AutoModelForCausalLM.from_pretrained("<out>/decoder") loads it with plain transformers
    <out>/projector.safetensors  the audio projector, the separator and the no-audio embedding
    <out>/encoder.json           the audio encoder's spec and fingerprint (what the training store was made with)
    <out>/mellow.json            model settings (prompt format, audio width), where it came from, its eval scores
    <out>/README.md              a model card: what it is, how to run it, how it was trained, its scores

`uv run mellow ask --model <out>` loads it; the encoder is rebuilt from encoder.json and checked against its
fingerprint.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mellow.config import from_dict
from mellow.evaluate.metrics import main_metric
from mellow.files import read_json, replace_directory, write_json_atomic, write_text_atomic
from mellow.model.modeling import MellowModel, build_model
from mellow.progress import console
from mellow.settings import ExportConfig, ModelConfig, saved_model_settings, saved_settings
from mellow.train.checkpoint import load_trained_model
from mellow.train.runs import find_checkpoint

FORMAT_VERSION = 1


PROJECTOR_PREFIXES = ("audio_projector.", "no_audio_embedding", "audio_separator")


def export(config: ExportConfig) -> Path:
    """Write the checkpoint's model to `config.out`; returns it."""
    started = time.time()
    checkpoint = find_checkpoint(config.checkpoint, config.which)
    model, tokenizer, trainer = load_trained_model(checkpoint, torch.device("cpu"))
    temporary = config.out.with_name(f"{config.out.name}.tmp-export")
    if temporary.exists():
        shutil.rmtree(temporary)
    decoder = merge_adapters(model.language_model)
    decoder.save_pretrained(temporary / "decoder")
    tokenizer.save_pretrained(temporary / "decoder")
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()
               if name.startswith(PROJECTOR_PREFIXES)}, temporary / "projector.safetensors")
    scores_path = checkpoint / "eval-test" / "scores.json"
    scores = read_json(scores_path) if scores_path.exists() else None
    model_settings = saved_model_settings(trainer["config"]["model"])
    info = {"format": FORMAT_VERSION, "audio_dim": trainer["store_fingerprint"]["dim"],
            "model": model_settings, "source": {"checkpoint": str(checkpoint), "update": trainer["update"],
                                                "store": trainer["store"], "train": trainer["config"]["train"]},
            "eval": scores}
    write_json_atomic(temporary / "encoder.json", trainer["store_fingerprint"])
    write_json_atomic(temporary / "mellow.json", info)
    write_text_atomic(temporary / "README.md", model_card(info, trainer["store_fingerprint"]))
    replace_directory(temporary, config.out)
    size = sum(f.stat().st_size for f in config.out.rglob("*") if f.is_file()) / 2**20
    console.print(f"[bold green]exported[/] {checkpoint} (update {trainer['update']}) to {config.out} "
                  f"({size:.1f} MiB, {time.time() - started:.1f} s). Try: uv run mellow ask --model {config.out} "
                  "clip.wav \"Describe the audio.\"", highlight=False)
    return config.out


def merge_adapters(language_model: torch.nn.Module) -> torch.nn.Module:
    """The decoder with every LoRA adapter merged into the layer it wraps (a plain transformers model again)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(language_model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(language_model.get_submodule(parent), child, module.get_base_layer())
    return language_model


def exported_encoder(folder: Path) -> dict:
    """The encoder fingerprint of an export folder, once the folder is checked to be a complete export this
    mellow reads."""
    for name in ("mellow.json", "encoder.json", "projector.safetensors", "decoder/config.json"):
        if not (folder / name).is_file():
            raise ValueError(f"--model {folder}: no {name}; pass a folder written by `mellow export`")
    found = read_json(folder / "mellow.json").get("format")
    if found != FORMAT_VERSION:
        raise ValueError(f"--model {folder}: export format {found}, this mellow reads {FORMAT_VERSION}")
    return read_json(folder / "encoder.json")


def load_exported_model(folder: Path, device: torch.device) -> tuple[MellowModel, object]:
    """Rebuild the model of an export folder (checked by exported_encoder first); returns (model, tokenizer)."""
    exported_encoder(folder)
    info = read_json(folder / "mellow.json")
    settings = {**saved_model_settings(info["model"]), "decoder": f"hf:{folder / 'decoder'}", "decoder_mode": "full"}
    model, tokenizer = build_model(from_dict(ModelConfig, settings, "model"), info["audio_dim"], seed=0)
    weights = load_file(folder / "projector.safetensors")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    absent = [name for name in missing if name.startswith(PROJECTOR_PREFIXES)]
    if absent or unexpected:
        raise ValueError(f"--model {folder}: projector.safetensors does not fit the model (missing {absent[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.to(device).eval(), tokenizer


def model_card(info: dict, encoder: dict) -> str:
    model, train = info["model"], saved_settings({"train": info["source"]["train"]})
    lines = [
        "# A Mellow-style audio-language model, exported by mellow", "",
        "Two audio clips and a text prompt in, free text out: a frozen audio encoder, a trained audio projector "
        "and a causal language model.", "",
        "## Use", "", "```bash", "uv run mellow ask --model . clip.wav \"Describe the audio.\"",
        "uv run mellow ask --model . first.wav second.wav \"Which one is louder?\"", "```", "",
        "The decoder alone loads with plain transformers: "
        "`AutoModelForCausalLM.from_pretrained(\"decoder\")`.", "",
        "## Parts", "",
        f"- audio encoder: `{encoder['encoder']}`, {encoder.get('clip_seconds')} s clips, {encoder['tokens']} "
        f"tokens of width {encoder['dim']} per clip (spec and fingerprint in `encoder.json`; weights hash "
        f"`{encoder.get('weights_hash', 'n/a')}`)",
        f"- decoder: `{model['decoder']}`, trained in `{model['decoder_mode']}` mode"
        + (" (LoRA adapters merged)" if model["decoder_mode"] == "lora" else ""),
        f"- prompt format: `{model.get('prompt_format', 'plain')}`", "",
        "## Training", "",
        f"- checkpoint: `{info['source']['checkpoint']}` at update {info['source']['update']} of "
        f"{train.get('train.max_updates', '?')}",
        f"- dataset: `{train.get('train.dataset', '?')}`, store `{info['source']['store']}`",
        # checkpoints of older mellow versions lack settings added since (their defaults applied)
        f"- batch {train.get('train.data.batch_size', '?')}, learning rate {train.get('train.optimizer.lr', '?')}, "
        f"precision {train.get('train.precision', 'fp32')}, seed {train.get('train.seed', 0)}", "",
        "## Scores", "",
    ]
    if info["eval"] is None:
        lines.append("Not evaluated: run `04_eval` on the checkpoint before exporting to include its test scores.")
    else:
        lines += [f"On the test split ({info['eval'].get('settings', {}).get('beams', 1)} beam(s)):", "",
                  "| task | n | score |", "|---|---|---|"]
        for task, values in info["eval"]["scores"].items():
            metric, value = main_metric(values)
            lines.append(f"| {task} | {values['count']} | {metric} {value:.3f} |")
    return "\n".join(lines) + "\n"

