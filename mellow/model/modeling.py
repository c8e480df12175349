"""The Mellow-style audio-language model: frozen-encoder tokens -> audio projector -> causal LM.

Input sequence per example (left to right):

    [audio1: its valid tokens][sep][audio2: its valid tokens, or one "no audio" marker][sep]
    [prompt tokens "\n"][answer tokens][eos]

or, with `--model.prompt_format chat`, inside the decoder tokenizer's chat template (SmolLM2's shown):

    [<|im_start|>system\n<|im_end|>\n<|im_start|>user\n][audio1][sep][audio2][sep]
    [prompt tokens <|im_end|>\n<|im_start|>assistant\n][answer tokens][eos = <|im_end|>]

A batch's rows hold only that content, one after the other, padded at the end (at the start for generation,
so that every row ends where decoding starts); a missing second audio is one learned marker token (not a random
other clip, as in the original Mellow code). Loss is on answer tokens and EOS only.

`--model.missing_audio block`, the layout of models made before that setting existed, keeps every audio slot
padded to the store's T tokens (those past a clip's valid count masked out) and fills a missing second audio with
T copies of the learned "no audio" embedding: such a model computes as it always did.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig

from mellow.model.decoders import load_decoder, load_tokenizer
from mellow.settings import ModelConfig


class AudioProjector(nn.Module):
    """Per-token MLP as in Mellow: Linear -> GELU -> Linear -> dropout, residual from the first Linear, LayerNorm."""

    def __init__(self, audio_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(audio_dim, hidden, bias=False)
        self.linear2 = nn.Linear(hidden, hidden, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        first = self.linear1(audio)  # (B, T, H)
        return self.layer_norm(first + self.dropout(self.linear2(F.gelu(first))))


class MellowModel(nn.Module):
    def __init__(self, language_model: nn.Module, audio_dim: int, dropout: float,
                 loss_weighting: Literal["example", "token"] = "example",
                 template: tuple[list[int], str] = ([], "\n"),
                 missing_audio: Literal["marker", "block"] = "marker") -> None:
        super().__init__()
        self.loss_weighting = loss_weighting
        self.missing_audio = missing_audio
        prefix_ids, self.prompt_suffix = template  # see prompt_template
        self.register_buffer("prefix_ids", torch.tensor(prefix_ids, dtype=torch.long), persistent=False)
        hidden = language_model.get_input_embeddings().embedding_dim
        self.language_model = language_model
        self.audio_projector = AudioProjector(audio_dim, hidden, dropout)
        self.no_audio_embedding = nn.Parameter(torch.randn(hidden) * 0.02)
        self.frozen_overrides: set[str] = set()  # frozen weights loaded by --init-from, saved in checkpoints
        self.audio_separator = nn.Parameter(torch.randn(hidden) * 0.02)

    def checkpoint_layers(self, share: float) -> int:
        """Recompute the activations of `share` of the decoder's layers in the backward pass instead of keeping
        them (gradient checkpointing, non-reentrant: the same dropout, the same gradients); returns how many."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        decoder = self.language_model
        if hasattr(decoder, "activation_checkpointing_enable"):  # its name from transformers 5.x on
            decoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = [module for module in decoder.modules() if isinstance(module, GradientCheckpointingLayer)]
        count = round(share * len(layers))
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index < count
        return count

    def get_audio_features(self, audio: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, T, D_audio) -> decoder-width embeddings (B, T, H)."""
        return self.audio_projector(audio)

    def build_inputs(self, batch: dict[str, torch.Tensor],
                     for_generation: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings (R, L, H), attention mask (R, L), position ids (R, L) of the rows, and where each text token
        sits in them (B, L_text), as an index into the R x L positions flattened. Without packing a row is an
        example (R = B): its content alone, packed left (training) or right (`for_generation`, the text left-padded);
        the block layout keeps every slot at its padded place. With packing (`batch["row"]`, the row of each
        example, examples of a row one after the other in batch order), the examples of a row follow one another,
        each with positions from 0 (pack_rows)."""
        audio1 = self.get_audio_features(batch["audio1"])  # (B, T, H)
        audio2 = self.get_audio_features(batch["audio2"])  # (B, T, H)
        has_audio2 = batch["has_audio2"]  # (B,)
        batch_size, tokens, hidden = audio1.shape
        separator = self.audio_separator.to(audio1.dtype).expand(batch_size, 1, -1)  # (B, 1, H)
        text = self.language_model.get_input_embeddings()(batch["input_ids"])  # (B, L_text, H)
        prefix = self.language_model.get_input_embeddings()(self.prefix_ids).expand(batch_size, -1, -1)  # (B, P, H)
        no_audio = self.no_audio_embedding.to(audio2.dtype)
        slots = torch.arange(tokens, device=audio1.device)
        valid1 = slots[None] < batch["audio1_valid"][:, None]  # (B, T)
        valid2 = (slots[None] < batch["audio2_valid"][:, None]) & has_audio2[:, None]  # (B, T)
        ones = torch.ones(batch_size, 1, dtype=torch.bool, device=audio1.device)
        prefix_ones, text_mask = ones.expand(-1, len(self.prefix_ids)), batch["text_mask"].bool()
        rows = torch.arange(batch_size, device=audio1.device)[:, None]  # (B, 1)
        if self.missing_audio == "block":
            audio2 = torch.where(has_audio2[:, None, None], audio2, no_audio.expand_as(audio2))
            embeds = torch.cat([prefix.to(text.dtype), audio1, separator, audio2, separator, text], dim=1)
            mask = torch.cat([prefix_ones, valid1, ones, valid2 | ~has_audio2[:, None], ones, text_mask], dim=1)
            position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # masked tokens do not advance positions
            text_at = embeds.shape[1] - text.shape[1] + torch.arange(text.shape[1], device=text.device)
            return embeds, mask.long(), position_ids, rows * embeds.shape[1] + text_at
        marker = no_audio.expand(batch_size, 1, -1)  # (B, 1, H)
        source = torch.cat([prefix.to(text.dtype), audio1, separator, audio2, marker, separator, text], dim=1)
        kept = torch.cat([prefix_ones, valid1, ones, valid2, ~has_audio2[:, None], ones, text_mask], dim=1)
        lengths = kept.sum(dim=1)  # (B,) each row's content
        width = int(lengths.max())
        content = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :width]  # (B, W) kept, in order
        within = kept.long().cumsum(dim=1)[:, -text.shape[1] :] - 1  # (B, L_text) each kept text token's place
        if "row" in batch:
            return self.pack_rows(source, content, lengths, batch["row"], within)
        columns = torch.arange(width, device=kept.device)[None]
        start = (width - lengths)[:, None] if for_generation else torch.zeros_like(lengths)[:, None]  # (B, 1)
        mask = (columns >= start) & (columns < start + lengths[:, None])  # (B, W)
        index = content.gather(1, (columns - start).clamp(min=0, max=width - 1))
        embeds = source.gather(1, index[..., None].expand(-1, -1, hidden))
        if for_generation:
            position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        else:  # content from column 0; the padding after it goes on counting, so the rows need only a causal mask
            position_ids = columns.expand(batch_size, -1)
        return embeds, mask.long(), position_ids, rows * width + within + start

    @staticmethod
    def pack_rows(source: torch.Tensor, content: torch.Tensor, lengths: torch.Tensor, row: torch.Tensor,
                  within: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """build_inputs for a packed batch: the content of each example (`content` indexes `source`, (B, S, H),
        `lengths` long) placed after the examples before it in its `row`; positions restart at 0 for each
        example, and for the padding at a row's end. A decoder that keeps attention within the runs of positions
        counting up from 0 (transformers' packed-sequence masks; flash attention's varlen path) sees each example
        alone (check_packing verifies this of a decoder)."""
        batch_size, length, hidden = source.shape
        row_count = int(row.max()) + 1
        in_row = F.one_hot(row, row_count) * lengths[:, None]  # (B, R) each example's positions, in its row
        start = ((in_row.cumsum(dim=0) - in_row) * F.one_hot(row, row_count)).sum(dim=1)  # (B,) before it in its row
        row_lengths = in_row.sum(dim=0)  # (R,)
        width = int(row_lengths.max())
        columns = torch.arange(content.shape[1], device=source.device)[None]  # (1, W_example)
        filled = columns < lengths[:, None]  # (B, W_example) real content
        target = (row[:, None] * width + start[:, None] + columns)[filled]  # (n,) where each content token goes
        taken = (torch.arange(batch_size, device=source.device)[:, None] * length + content)[filled]  # (n,)
        index = torch.full((row_count * width,), batch_size * length, dtype=torch.long, device=source.device)
        index[target] = taken  # the other places take the zero row appended below
        flat = torch.cat([source.reshape(-1, hidden), source.new_zeros(1, hidden)])
        embeds = flat[index].view(row_count, width, hidden)
        positions = torch.arange(width, device=source.device)[None].expand(row_count, -1)
        mask = positions < row_lengths[:, None]  # (R, W)
        first = torch.zeros(row_count * width, dtype=torch.long, device=source.device)  # each place's run start
        first[target] = (start[:, None] + torch.zeros_like(columns))[filled]
        first = torch.where(mask, first.view(row_count, width), row_lengths[:, None])  # the padding: one more run
        text_at = (row * width + start)[:, None] + within
        return embeds, mask.long(), positions - first, text_at

    def sequence_positions(self, text_lengths: np.ndarray, audio_tokens: int, valid1: np.ndarray,
                           valid2: np.ndarray) -> np.ndarray:
        """(n,) positions each example's sequence takes in a training row: the prefix, its audio (block: both slots
        padded to `audio_tokens`; marker: the valid tokens of each clip, `valid2` < 0 for a missing second audio
        taking the marker's one), two separators and its text."""
        text = np.asarray(text_lengths, dtype=np.int64)
        if self.missing_audio == "block":
            return len(self.prefix_ids) + 2 * audio_tokens + 2 + text
        second = np.where(valid2 < 0, 1, valid2)
        return len(self.prefix_ids) + np.asarray(valid1, dtype=np.int64) + second + 2 + text

    def positions_of(self, batch: dict[str, torch.Tensor]) -> tuple[int, torch.Tensor, int]:
        """(positions computed, (B,) useful positions of each example, valid audio tokens) of a training batch:
        rows x the layout's width are computed; the useful ones carry an example's content (prefix, valid audio
        tokens, separators, text), not padding, not the slots past a clip's valid count (block), not the "no
        audio" marker or block of a single-audio example."""
        rows, tokens = batch["audio1"].shape[:2]
        fixed = len(self.prefix_ids) + 2
        audio = batch["audio1_valid"] + batch["audio2_valid"] * batch["has_audio2"]  # (B,)
        useful = fixed + audio + batch["text_mask"].sum(dim=1)  # (B,)
        if self.missing_audio == "block":
            width = fixed + 2 * tokens + batch["input_ids"].shape[1]
        elif "row" in batch:  # packed: the rows' longest
            rows = int(batch["row"].max()) + 1
            per_row = torch.zeros(rows, dtype=torch.long).index_add_(0, batch["row"], useful + ~batch["has_audio2"])
            width = int(per_row.max())
        else:
            width = int((useful + ~batch["has_audio2"]).max())  # the marker takes a position
        return rows * width, useful, int(audio.sum())

    def forward(self, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over answer (+EOS) tokens: mean per example, then over examples (or over all tokens).
        `reduction="sum"` gives the sum over the examples (or tokens) instead, for a loss that 03_train divides by
        the whole update's count (`loss_count`), whatever micro-batches and ranks it is split into."""
        token_losses, example_of_token, scored = self.answer_token_losses(batch)
        weight = batch.get("loss_weight")  # (B,) class-balancing weights (--train.balance loss), or None
        if self.loss_weighting == "token":
            losses = token_losses if weight is None else token_losses * weight[example_of_token]
        else:
            per_example = torch.zeros(scored.shape[0], device=scored.device).index_add_(0, example_of_token,
                                                                                        token_losses)
            per_example = per_example / scored.sum(dim=1).clamp(min=1)  # (B,)
            losses = per_example if weight is None else per_example * weight
        return losses.sum() if reduction == "sum" else losses.mean()

    def loss_count(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms the batch's loss sums: its examples, or its answer tokens (token weighting)."""
        if self.loss_weighting == "token":
            return int((batch["labels"] != -100).sum())
        return int(batch["labels"].shape[0])

    @torch.inference_mode()
    def answer_log_likelihood(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) log-probability of each example's whole answer (+EOS) given its audio and prompt: how the model
        ranks the allowed answers of a closed question (04_eval --closed rank)."""
        token_losses, example_of_token, scored = self.answer_token_losses(batch)
        return -torch.zeros(scored.shape[0], device=scored.device).index_add_(0, example_of_token, token_losses)

    def answer_token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cross-entropy of each answer token (N,), the example each belongs to (N,), answer mask (B, L_text))."""
        embeds, mask, position_ids, text_at = self.build_inputs(batch)
        # Rows of the marker layout hold their content first and padding after it, so causal attention alone
        # keeps every content position from the padding: no mask to build (SDPA's causal kernel; and inductor
        # miscompiles the mask of these rows on CPUs, torch 2.11). A packed row's examples are kept apart by
        # where their positions restart (transformers' packed-sequence mask, or flash attention's varlen path).
        attention = None if self.missing_audio == "marker" else mask
        hidden = self.language_model.base_model(inputs_embeds=embeds, attention_mask=attention, use_cache=False,
                                                position_ids=position_ids).last_hidden_state  # (R, L, H)
        # A text token is predicted from the position before it; only answer positions are scored, and the
        # output projection runs on those alone (the vocabulary matmul dominates a small decoder's cost).
        flat = hidden.reshape(-1, hidden.shape[-1])  # (R x L, H)
        predicting = flat[(text_at - 1).clamp(min=0, max=len(flat) - 1)]  # (B, L_text, H) predicting each text token
        labels = batch["labels"]  # (B, L_text), -100 outside the answer
        scored = labels != -100
        answers = predicting[scored]  # (N, H)
        output_projection = self.language_model.get_output_embeddings()
        if answers.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # torch's bf16 CPU matmul keeps a packed copy of the weight for every new number of rows (19 MB for
            # the 49 k-word output projection): N differs per batch, so it is rounded up to a multiple of 32
            # rows, or a bf16 run's memory grew by GBs
            logits = output_projection(F.pad(answers, (0, 0, 0, -len(answers) % 32)))[: len(answers)]  # (N, V)
        else:
            logits = output_projection(answers)  # (N, V)
        token_losses = F.cross_entropy(logits.float(), labels[scored], reduction="none")  # (N,)
        return token_losses, scored.nonzero()[:, 0], scored

    @torch.inference_mode()
    def generate(self, batch: dict[str, torch.Tensor], max_new_tokens: int, eos_token_id: int,
                 num_beams: int = 1) -> list[list[int]]:
        """Batched greedy (num_beams 1) or beam-search decoding with a KV cache, by transformers' `generate` on
        the audio + prompt embeddings; each answer stops at EOS or max_new_tokens. The prompt text must be
        left-padded. Returns the answer token ids of every example, without the EOS."""
        embeds, mask, _, _ = self.build_inputs(batch, for_generation=True)  # generate derives positions from the mask
        settings = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                    eos_token_id=eos_token_id, pad_token_id=eos_token_id)
        tokens = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                              generation_config=settings).tolist()  # (B, new tokens)
        return [row[: row.index(eos_token_id)] if eos_token_id in row else row for row in tokens]

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds: those that train, and frozen ones that differ from the base decoder
        (loaded by --init-from). The rest of a frozen or LoRA decoder is referenced by name, not copied."""
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        keep = trainable | self.frozen_overrides
        return {name: tensor for name, tensor in self.state_dict().items() if name in keep}

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what checkpoint_state_dict saved; every trainable weight must be there."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        absent = {name for name in trainable if name not in state}
        if unexpected or absent:
            raise ValueError(f"checkpoint does not match the model: unexpected {sorted(unexpected)[:5]}, "
                             f"missing {sorted(absent)[:5]}")
        self.frozen_overrides = set(state) - trainable


class PackingUnsupportedError(ValueError):
    """--train.packing on with a decoder whose attention crosses from one packed example to the next."""


@torch.no_grad()
def check_packing(model: MellowModel, decoder: str) -> None:
    """Refuse packing unless the decoder keeps attention within each example of a packed row: a probe row of two
    random sequences (positions restarting at the second) must give the second the hidden states it has alone.
    Decoders whose attention has no packed-sequence support (OPT's and BLOOM's in transformers 5, custom kernels)
    let the second sequence see the first."""
    language_model = model.language_model
    parameter = next(language_model.parameters())
    width = language_model.get_input_embeddings().embedding_dim
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randn(1, length, width, generator=generator).to(parameter) for length in (3, 4))
    training = language_model.training
    language_model.eval()  # no dropout in the probe
    try:
        body = language_model.base_model
        alone = body(inputs_embeds=second, position_ids=torch.arange(4, device=parameter.device)[None],
                     use_cache=False).last_hidden_state
        positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=parameter.device)
        packed = body(inputs_embeds=torch.cat([first, second], dim=1), position_ids=positions,
                      use_cache=False).last_hidden_state[:, 3:]
    finally:
        language_model.train(training)
    tolerance = 1e-3 if parameter.dtype == torch.float32 else 5e-2
    if not torch.allclose(alone.float(), packed.float(), atol=tolerance, rtol=tolerance):
        kind = type(language_model).__name__
        attention = getattr(language_model.config, "_attn_implementation", "?")
        raise PackingUnsupportedError(
            f"--train.packing on: the decoder {decoder} ({kind}, attention {attention!r}) lets attention cross from "
            "one packed example to the next (it has no packed-sequence support in this transformers); use "
            "--train.packing off")


def build_model(model_config: ModelConfig, audio_dim: int, seed: int) -> tuple[MellowModel, object]:
    """The model of `model_config` on the CPU, its projector (and a tiny decoder) initialised from `seed`, and
    its tokenizer."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_config.decoder)
    shape = (model_config.tiny_hidden, model_config.tiny_layers, model_config.tiny_heads)
    language_model = load_decoder(model_config.decoder, tokenizer, shape)
    if model_config.decoder_mode == "lora":
        language_model = add_lora(language_model, model_config)
    elif model_config.decoder_mode == "frozen":
        language_model.requires_grad_(False)
    model = MellowModel(language_model, audio_dim, model_config.projector_dropout, model_config.loss_weighting,
                        prompt_template(tokenizer, model_config.prompt_format), model_config.missing_audio)
    if model_config.audio_scale == "embeddings":
        with torch.no_grad():
            model.audio_projector.layer_norm.weight.fill_(embedding_rms(language_model))
    return model, tokenizer


def embedding_rms(language_model: nn.Module) -> float:
    """The root mean square of the decoder's token embeddings: the size text tokens enter it at."""
    return language_model.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt().item()


def prompt_template(tokenizer, prompt_format: str) -> tuple[list[int], str]:
    """The token ids that come before the audio, and the text that follows every prompt, for `prompt_format`."""
    if prompt_format == "plain":
        return [], "\n"
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--model.prompt_format chat: the decoder's tokenizer has no chat template; use plain")
    marker = "\ue000audio\ue000"  # a private-use character no prompt contains
    user = {"role": "user", "content": marker}
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": ""}, user], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # templates that refuse a system turn raise their own error types
        text = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    before, after = text.split(marker)
    return tokenizer(before, add_special_tokens=False)["input_ids"], after


def add_lora(language_model: nn.Module, model_config: ModelConfig) -> nn.Module:
    """LoRA adapters injected into the decoder in place (peft); only the adapters of the decoder train."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = model_config.lora_targets.strip()
    config = LoraConfig(r=model_config.lora_rank, lora_alpha=model_config.lora_alpha,
                        lora_dropout=model_config.lora_dropout,
                        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
    try:
        return inject_adapter_in_model(config, language_model)
    except ValueError as error:
        raise ValueError(f"--model.lora_targets {targets!r}: {error}") from None

