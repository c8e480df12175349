"""How much of a run's compute was useful: positions computed and useful, tokens/s, data wait, and model FLOPs
utilisation (MFU), per progress window and for the whole invocation.

A batch computes rows x its layout's positions (mellow/model/modeling.py); the useful ones carry an example's
content (not padding, not audio tokens past a clip's valid count, not the "no audio" block of a single-audio
example). Model FLOPs count what the model needs per useful position, the usual estimate of training cost:

    2 x parameters per position forward, 2 x parameters backward to the inputs (the projector below the decoder
    always trains), 2 x trainable parameters backward to the weights;
    the decoder body on every useful position, the audio projector on valid audio tokens, the output projection
    on answer tokens only (the loss is computed there alone);
    causal attention: 6 x layers x hidden x length^2 per example (QK^T and AV, forward and backward).

MFU is those FLOPs per second over the device's peak: a CUDA device's from a table of known devices (dense bf16
or fp16 tensor-core peak, or fp32), a CPU's from a matmul measured at start-up in the run's precision, or
omitted with the reason (an unknown GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

import torch

# Dense peak FLOP/s of known CUDA devices (vendor datasheets): (a substring of the device's name, bf16/fp16, fp32).
# fp32 is the plain fp32 peak: torch runs fp32 matmuls without TF32 unless asked.
CUDA_PEAKS = (
    ("H100 PCIe", 756e12, 51e12),
    ("H100 NVL", 835e12, 60e12),
    ("H100", 989e12, 67e12),  # SXM
    ("H200", 989e12, 67e12),
    ("GH200", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("A10G", 70e12, 31.2e12),
    ("A10", 125e12, 31.2e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("V100", 125e12, 15.7e12),  # fp16 (no bf16)
)


def cuda_peak(name: str, precision: str) -> float | None:
    for known, half, single in CUDA_PEAKS:
        if known in name:
            return half if precision in ("bf16", "fp16") else single
    return None


@functools.cache
def measured_cpu_peak(precision: str, threads: int, seconds: float = 0.15) -> float:
    """FLOP/s of a 512 x 512 matmul in `precision` on `threads` threads, the best of repeated runs for `seconds`:
    the CPU's practical peak for the run's arithmetic (measured once per process)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(512, 512, generator=torch.Generator().manual_seed(0)).to(dtype), torch.eye(512, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    torch.mm(a, b)
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * 512**3 / (time.perf_counter() - started))
    return best


def device_peak(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device in `precision`, where it comes from); None with the reason when unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = cuda_peak(name, precision)
        if peak is None:
            return None, f"MFU omitted: no peak FLOP/s known for {name} (mellow/train/throughput.py CUDA_PEAKS)"
        return peak, f"{name} {precision} peak {peak / 1e12:.0f} TFLOP/s (datasheet)"
    if device.type == "cpu":
        peak = measured_cpu_peak(precision, torch.get_num_threads())
        return peak, f"CPU {precision} matmul measured at start-up: {peak / 1e9:.1f} GFLOP/s"
    return None, f"MFU omitted: no peak FLOP/s known for {device.type} devices"


@dataclass
class FlopModel:
    """Parameter counts of a model's parts, counted once; `step` gives the model FLOPs of one training step."""

    projector: int
    projector_trainable: int
    body: int
    body_trainable: int
    head: int
    head_trainable: int
    layers: int
    hidden: int

    @classmethod
    def of(cls, model) -> FlopModel:
        decoder = model.language_model
        embedding, head = decoder.get_input_embeddings().weight, decoder.get_output_embeddings().weight
        exclude = {id(embedding), id(head)}
        body = [p for p in decoder.parameters() if id(p) not in exclude]
        projector = list(model.audio_projector.parameters())
        config = decoder.config
        return cls(sum(p.numel() for p in projector), sum(p.numel() for p in projector if p.requires_grad),
                   sum(p.numel() for p in body), sum(p.numel() for p in body if p.requires_grad),
                   head.numel(), head.numel() if head.requires_grad else 0,
                   config.num_hidden_layers, config.hidden_size)

    def step(self, audio_tokens: float, positions: float, answer_tokens: float, squared_lengths: float) -> float:
        """Model FLOPs of a training step over these counts (see the module docstring)."""
        return (2 * (2 * self.projector + self.projector_trainable) * audio_tokens
                + 2 * (2 * self.body + self.body_trainable) * positions
                + 2 * (2 * self.head + self.head_trainable) * answer_tokens
                + 6 * self.layers * self.hidden * squared_lengths)


@dataclass
class Work:
    """What some training steps computed: examples, positions computed and useful, model FLOPs, the seconds the
    steps took and the seconds of them spent waiting for batches. Summed over windows and ranks."""

    examples: float = 0.0
    computed: float = 0.0
    useful: float = 0.0
    flops: float = 0.0
    seconds: float = 0.0
    wait: float = 0.0

    def add(self, other: Work) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_list(self) -> list[float]:
        """The fields in order (Work(*values) makes one again), for one all-reduce."""
        return [getattr(self, field.name) for field in dataclasses.fields(self)]

    def rates(self, ranks: int, peak: float | None) -> dict[str, float]:
        """The figures as logged, of all `ranks` together per second of a training step (the ranks' mean; the time
        spent validating and saving is not in it); data_wait is the share of that time spent waiting for batches;
        mfu only with a known peak."""
        seconds = max(self.seconds / ranks, 1e-9)
        rates = {"samples_per_s": self.examples / seconds, "tokens_per_s": self.computed / seconds,
                 "useful_tokens_per_s": self.useful / seconds,
                 "useful_share": self.useful / self.computed if self.computed else 0.0,
                 "data_wait": self.wait / ranks / seconds}
        if peak:
            rates["mfu"] = self.flops / seconds / (peak * ranks)
        return rates


def work_of(model, flop_model: FlopModel, batch: dict[str, torch.Tensor]) -> Work:
    """The Work of one training batch (CPU tensors, before they move to the device)."""
    computed, lengths, audio = model.positions_of(batch)
    answers = float((batch["labels"] != -100).sum())
    flops = flop_model.step(float(audio), float(lengths.sum()), answers, float((lengths.double() ** 2).sum()))
    return Work(examples=len(lengths), computed=computed, useful=float(lengths.sum()), flops=flops)


def describe(rates: dict[str, float]) -> str:
    """The progress line's part: `412 samples/s, 19.8 k tok/s (useful 93%), data wait 1%, MFU 34%`."""
    text = (f"{rates['samples_per_s']:.0f} samples/s, {rates['useful_tokens_per_s'] / 1e3:.1f} k useful tok/s "
            f"({rates['useful_share']:.0%} of computed), data wait {rates['data_wait']:.0%}")
    return text + (f", MFU {rates['mfu']:.1%}" if "mfu" in rates else "")
