"""--train.mem_budget: recomputing activations instead of keeping them changes neither the loss nor the
gradients, and a run with it on still resumes exactly."""

from __future__ import annotations

import torch

from mellow.model.decoders import load_tokenizer
from mellow.model.modeling import build_model
from mellow.settings import ModelConfig
from mellow.store.reader import EmbeddingStore
from mellow.train import loop
from mellow.train.data import ExampleSet

from conftest import logged_losses, train_config

MODEL = {"decoder": "tiny", "tiny_hidden": 32, "tiny_layers": 4, "tiny_heads": 2, "projector_dropout": 0.1}


def _loss_and_gradients(mel_store, tiny_dataset, share: float) -> tuple[float, dict[str, torch.Tensor], int]:
    store = EmbeddingStore(mel_store)
    model, tokenizer = build_model(ModelConfig(**MODEL), store.dim, seed=3)
    checkpointed = model.checkpoint_layers(share) if share else 0
    examples = ExampleSet.from_split(tiny_dataset, "train", store, tokenizer, 64)
    model.train()
    torch.manual_seed(0)  # the same dropout masks
    loss = model(examples.batch(list(range(8))))
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, \
        checkpointed


def test_recomputing_activations_gives_the_same_loss_and_gradients(mel_store, tiny_dataset):
    assert load_tokenizer("tiny") is not None
    loss, gradients, _ = _loss_and_gradients(mel_store, tiny_dataset, 0.0)
    for share, layers in ((0.5, 2), (1.0, 4)):
        other_loss, other_gradients, checkpointed = _loss_and_gradients(mel_store, tiny_dataset, share)
        assert checkpointed == layers
        assert other_loss == loss
        assert other_gradients.keys() == gradients.keys()
        for name, gradient in gradients.items():
            torch.testing.assert_close(other_gradients[name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def test_a_run_with_a_memory_budget_resumes_exactly(mel_store, tiny_dataset, tmp_path):
    model = ModelConfig(**MODEL)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    loop.run(train_config(mel_store, tiny_dataset, straight, mem_budget=0.0), model)
    loop.run(train_config(mel_store, tiny_dataset, stopped, mem_budget=0.0, stop_after=3), model)
    loop.run(train_config(mel_store, tiny_dataset, stopped, mem_budget=0.0), model, resume=True)
    assert logged_losses(stopped) == logged_losses(straight)
    first, second = (torch.load(run / "step-000008" / "model.pt") for run in (straight, stopped))
    assert all(torch.equal(first[key], second[key]) for key in first)
    plain = tmp_path / "plain"  # and the budget only trades memory for time: the same losses as without it
    loop.run(train_config(mel_store, tiny_dataset, plain), model)
    for update, value in logged_losses(plain).items():
        assert abs(logged_losses(straight)[update] - value) <= 1e-5 * max(1.0, abs(value))
