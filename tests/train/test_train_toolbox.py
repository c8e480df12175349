"""The training toolbox: LoRA (peft), mixed precision with its scaler, skipped non-finite updates, the
warmup -> cosine -> cooldown schedule, per-group learning rates, and torch.compile (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mellow.config import from_names
from mellow.files import read_json, read_jsonl
from mellow.model.modeling import MellowModel
from mellow.settings import ModelConfig, TrainConfig
from mellow.store.reader import EmbeddingStore
from mellow.train import loop
from mellow.train.batching import epoch_micro_batches
from mellow.train.checkpoint import load_trained_model
from mellow.train.data import ExampleSet, load_examples
from mellow.train.loop import _optimizer, first_schedule
from mellow.train.runs import find_checkpoint

from conftest import TINY_MODEL, logged_losses, train_config


def _stop_and_resume_equals_straight(store: Path, dataset: Path, root: Path, model: ModelConfig,
                                     **overrides) -> tuple[Path, Path]:
    straight, stopped = root / "straight", root / "stopped"
    loop.run(train_config(store, dataset, straight, **overrides), model)
    loop.run(train_config(store, dataset, stopped, stop_after=3, **overrides), model)
    loop.run(train_config(store, dataset, stopped, **overrides), model, resume=True)
    assert logged_losses(stopped) == logged_losses(straight) and len(logged_losses(straight)) == 8
    first, second = (torch.load(find_checkpoint(run) / "model.pt") for run in (straight, stopped))
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    return straight, stopped


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    """A small pretrained-style decoder folder (random weights, saved with save_pretrained) and tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mellow.model.decoders import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    folder = tmp_path_factory.mktemp("decoder")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_lora_trains_adapters_and_projector_only_resumes_exactly_and_reloads(mel_store, tiny_dataset, tmp_path,
                                                                             decoder_dir):
    from safetensors.torch import load_file

    model = ModelConfig(decoder=f"hf:{decoder_dir}", decoder_mode="lora", lora_rank=4, lora_targets="q_proj,v_proj")
    straight, _ = _stop_and_resume_equals_straight(mel_store, tiny_dataset, tmp_path, model)
    checkpoint = find_checkpoint(straight)
    saved = torch.load(checkpoint / "model.pt")
    decoder_keys = [key for key in saved if key.startswith("language_model.")]
    assert decoder_keys and all(".lora_A." in key or ".lora_B." in key for key in decoder_keys)
    assert len(decoder_keys) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert any(key.startswith("audio_projector.") for key in saved)
    assert any(saved[key].abs().sum() > 0 for key in decoder_keys if ".lora_B." in key)  # B starts at 0
    base = load_file(decoder_dir / "model.safetensors")
    reloaded, tokenizer, trainer = load_trained_model(checkpoint, torch.device("cpu"))
    assert trainer["base_decoder"]["decoder"] == f"hf:{decoder_dir}"
    weight = "model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.equal(reloaded.language_model.get_parameter(weight), base["model.layers.0.self_attn.q_proj.weight"])
    store = EmbeddingStore(mel_store)
    examples = ExampleSet(load_examples(tiny_dataset, "test"), store, tokenizer, max_text_tokens=64)
    answers = reloaded.generate(examples.batch([0, 1], for_generation=True), 4, tokenizer.eos_token_id)
    assert len(answers) == 2
    # a checkpoint whose base decoder changed since is refused, not silently loaded onto other weights
    changed = {**base, "model.norm.weight": base["model.norm.weight"] * 2}
    from safetensors.torch import save_file

    save_file(changed, decoder_dir / "model.safetensors", metadata={"format": "pt"})
    try:
        with pytest.raises(ValueError, match="base decoder"):
            load_trained_model(checkpoint, torch.device("cpu"))
    finally:
        save_file(base, decoder_dir / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes_exactly(mel_store, tiny_dataset, tmp_path, precision):
    straight, _ = _stop_and_resume_equals_straight(mel_store, tiny_dataset, tmp_path, ModelConfig(**TINY_MODEL),
                                                   precision=precision)
    assert all(math.isfinite(loss) for loss in logged_losses(straight).values())
    scaler = torch.load(find_checkpoint(straight) / "optimizer.pt", weights_only=False)["scaler"]
    assert (scaler.get("scale", 0) > 0) == (precision == "fp16")  # the fp16 scaler state is saved
    weights = torch.load(find_checkpoint(straight) / "model.pt")
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())  # master weights stay fp32


def test_precision_auto_and_eager_attention_under_cpu_bf16(mel_store, tiny_dataset):
    """auto is bf16 where this CPU has native bf16 (AVX512-BF16 or AMX), else fp32; bf16 on a CPU switches the
    decoder to eager attention, which gives the loss SDPA gives (fp32, 1e-5) and trains in bf16; the output
    projection's rows are padded to a multiple of 32 under CPU autocast only."""
    from mellow.model.modeling import build_model

    store = EmbeddingStore(mel_store)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    cpu = torch.device("cpu")
    for setting, expected in (("auto", "bf16" if native else "fp32"), ("fp32", "fp32"), ("bf16", "bf16")):
        model, _ = build_model(ModelConfig(**TINY_MODEL), store.dim, seed=0)
        assert loop.training_precision(model, setting, cpu) == expected
        assert model.language_model.config._attn_implementation == ("eager" if expected == "bf16" else "sdpa")
    model, tokenizer = build_model(ModelConfig(**TINY_MODEL), store.dim, seed=0)
    model.eval()
    batch = ExampleSet(load_examples(tiny_dataset, "train"), store, tokenizer, 64).batch(list(range(8)))
    rows = []  # rows the output projection sees: under CPU bf16 a multiple of 32 (its packed-weight copies are
    # cached per row count), else exactly the answer tokens
    model.language_model.get_output_embeddings().register_forward_pre_hook(lambda _, inputs: rows.append(
        inputs[0].shape[0]))
    answer_tokens = int((batch["labels"] != -100).sum())
    with torch.no_grad():
        with_sdpa = model(batch)
        loop.training_precision(model, "bf16", cpu)
        eager = model(batch)
        with loop.mixed_precision("bf16", cpu):
            in_bf16 = model(batch)
    assert float(eager) == pytest.approx(float(with_sdpa), abs=1e-5) and float(in_bf16) != float(eager)
    assert float(in_bf16) == pytest.approx(float(eager), rel=0.05)
    assert rows[:2] == [answer_tokens, answer_tokens] and rows[2] % 32 == 0 and rows[2] >= answer_tokens


def test_an_update_with_non_finite_gradients_is_skipped(mel_store, tiny_dataset, tmp_path, monkeypatch):
    calls = {"count": 0}
    forward = MellowModel.forward

    def poisoned(self, batch, reduction="mean"):
        calls["count"] += 1
        loss = forward(self, batch, reduction)
        return loss * float("nan") if calls["count"] == 3 and self.training else loss

    monkeypatch.setattr(MellowModel, "forward", poisoned)
    run_dir = tmp_path / "run"
    loop.run(train_config(mel_store, tiny_dataset, run_dir, max_updates=4, save_every=1, keep_last=10),
              ModelConfig(**TINY_MODEL))
    before, after = (torch.load(run_dir / f"step-{update:06d}" / "model.pt") for update in (2, 3))
    assert all(torch.equal(before[key], after[key]) for key in before)  # update 3 changed nothing
    rows = {row["update"]: row for row in read_jsonl(run_dir / "metrics.jsonl")}
    assert math.isnan(rows[3]["grad_norm"]) and rows[3]["skipped_updates"] == 1 and rows[4]["skipped_updates"] == 1
    assert math.isfinite(rows[4]["loss"])
    assert read_json(run_dir / "step-000004" / "trainer.json")["skipped_updates"] == 1
    after_4 = torch.load(run_dir / "step-000004" / "model.pt")
    assert not all(torch.equal(after[key], after_4[key]) for key in after)  # and training went on


def test_schedule_warms_up_decays_by_cosine_and_cools_down_to_zero():
    config = from_names(TrainConfig, max_updates=100, warmup_updates=10, cooldown_updates=20, min_lr_ratio=0.1)
    factor = first_schedule(config, config.max_updates)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(45) == pytest.approx(0.55)  # cosine midpoint
    assert factor(79) > factor(80) == pytest.approx(0.1)  # the end of the cosine decay
    assert factor(90) == pytest.approx(0.05) and factor(99) == pytest.approx(0.005) and factor(100) == 0.0
    values = [factor(update) for update in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never rises after warmup
    with pytest.raises(ValueError, match="must not exceed"):
        from_names(TrainConfig, max_updates=20, warmup_updates=10, cooldown_updates=15)


def test_gradient_accumulation_equals_the_whole_batch_at_once(mel_store, tiny_dataset, tmp_path):
    """Two micro-batches of 4 accumulated give the update one batch of the same 8 examples gives (unbucketed
    order: the same examples in each update), and the loss and gradient norm logged for it."""
    model = ModelConfig(**TINY_MODEL, projector_dropout=0.0)
    rows = {}
    for accumulate in (1, 2):
        run_dir = tmp_path / f"accumulate-{accumulate}"
        loop.run(train_config(mel_store, tiny_dataset, run_dir, max_updates=3, batch_size=8, grad_accum=accumulate,
                               length_buckets=1, save_every=3), model)
        rows[accumulate] = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]
    assert [row["update"] for row in rows[1]] == [row["update"] for row in rows[2]] == [1, 2, 3]
    for whole, accumulated in zip(rows[1], rows[2]):
        assert accumulated["loss"] == pytest.approx(whole["loss"], rel=1e-5)
        assert accumulated["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    first, second = (load_trained_model(find_checkpoint(tmp_path / f"accumulate-{a}"),
                                        torch.device("cpu"))[0].state_dict() for a in (1, 2))
    assert all(torch.allclose(first[key], second[key], atol=1e-5) for key in first)


def test_projector_and_decoder_get_their_own_learning_rates(mel_store):
    from mellow.model.modeling import build_model

    model, _ = build_model(ModelConfig(**TINY_MODEL), EmbeddingStore(mel_store).dim, seed=0)
    optimizer = _optimizer(model, from_names(TrainConfig, lr=1e-3, projector_lr=5e-3, decoder_lr=2e-4))
    by_name = {group["name"]: group for group in optimizer.param_groups}
    assert set(by_name) == {"decoder/decay", "decoder/no", "projector/decay", "projector/no"}
    assert by_name["projector/decay"]["lr"] == 5e-3 and by_name["decoder/decay"]["lr"] == 2e-4
    assert by_name["decoder/no"]["weight_decay"] == 0.0 and by_name["projector/decay"]["weight_decay"] == 0.01
    projector = {id(p) for p in model.audio_projector.parameters()}
    assert projector <= {id(p) for group in ("projector/decay", "projector/no") for p in by_name[group]["params"]}


@pytest.mark.slow
def test_torch_compile_trains(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    result = loop.run(train_config(mel_store, tiny_dataset, run_dir, max_updates=4, compile=True),
                       ModelConfig(**TINY_MODEL))
    assert result.updates == 4 and all(math.isfinite(loss) for loss in logged_losses(run_dir).values())


@pytest.mark.slow
def test_torch_compile_under_a_memory_budget_recomputes_and_trains_as_eager(mel_store, tiny_dataset, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(torch._functorch.config, "activation_memory_budget", 1.0)  # restored after the test
    model = ModelConfig(**TINY_MODEL)
    loop.run(train_config(mel_store, tiny_dataset, tmp_path / "eager", max_updates=4), model)
    compiled = tmp_path / "compiled"
    loop.run(train_config(mel_store, tiny_dataset, compiled, max_updates=4, compile=True, mem_budget=0.0), model)
    assert torch._functorch.config.activation_memory_budget == 0.0  # what the partitioner was given
    eager, under_budget = logged_losses(tmp_path / "eager"), logged_losses(compiled)
    assert eager.keys() == under_budget.keys()
    for update, loss in eager.items():  # compiled kernels round differently: close, not bitwise
        assert abs(under_budget[update] - loss) <= 1e-3 * max(1.0, loss), (update, loss, under_budget[update])


@pytest.mark.parametrize("metric", ["val_loss", "val_accuracy"])
def test_best_checkpoint_follows_the_configured_metric(mel_store, tiny_dataset, tmp_path, metric):
    run_dir = tmp_path / "run"
    result = loop.run(train_config(mel_store, tiny_dataset, run_dir, max_updates=12, val_every=3, val_examples=16,
                               best_metric=metric, keep_last=10), ModelConfig(**TINY_MODEL))
    values = {row["update"]: row[metric] for row in read_jsonl(run_dir / "metrics.jsonl") if metric in row}
    assert sorted(values) == [3, 6, 9, 12]
    pick = min if metric == "val_loss" else max
    best_update = pick(values, key=lambda update: (values[update], update if pick is min else -update))
    best = read_json(run_dir / "best.json")
    assert best == {"path": f"step-{best_update:06d}", "update": best_update, "metric": metric,
                    "value": values[best_update]}
    assert result.best_value == values[best_update]
    if metric == "val_accuracy":
        assert all(0.0 <= value <= 1.0 for value in values.values())


def test_init_from_starts_a_new_run_from_trained_weights(mel_store, tiny_dataset, tmp_path, decoder_dir):
    from typer.testing import CliRunner

    from mellow.cli import app

    first, second = tmp_path / "first", tmp_path / "second"
    full = ModelConfig(decoder=f"hf:{decoder_dir}", decoder_mode="full")
    loop.run(train_config(mel_store, tiny_dataset, first, max_updates=8), full)
    trained = torch.load(find_checkpoint(first) / "model.pt")
    result = CliRunner().invoke(app, [
        "train", f"--train.store={mel_store}", f"--train.dataset={tiny_dataset}", f"--train.run_dir={second}",
        "--init-from", str(first), "--train.max_updates=2", "--train.batch_size=4", "--train.val_every=0",
        "--train.log_every=1", f"--model.decoder=hf:{decoder_dir}", "--model.decoder_mode=lora",
        "--model.lora_targets=q_proj,v_proj"])
    assert result.exit_code == 0, result.output
    assert "initialised from" in result.output and "a new run" in result.output
    trainer = read_json(second / "step-000002" / "trainer.json")
    assert trainer["initialised_from"] == str(find_checkpoint(first)) and trainer["update"] == 2
    optimizer = torch.load(second / "step-000002" / "optimizer.pt", weights_only=False)["optimizer"]
    assert all(int(state["step"]) == 2 for state in optimizer["state"].values())  # a fresh optimizer
    model, _, _ = load_trained_model(second / "step-000002", torch.device("cpu"))
    # the full run's decoder weights sit under the LoRA wrappers (they stay frozen there), and untouched
    # layers are the trained ones, not the base decoder's
    base = model.language_model.get_parameter("model.layers.0.self_attn.q_proj.base_layer.weight")
    assert torch.equal(base, trained["language_model.model.layers.0.self_attn.q_proj.weight"])
    # losses start where the first run ended, far below a fresh start
    assert logged_losses(second)[1] < logged_losses(first)[1]
    with pytest.raises(ValueError, match="trained with decoder"):
        loop.run(train_config(mel_store, tiny_dataset, tmp_path / "third", init_from=first), ModelConfig(**TINY_MODEL))


def _sound_kind_classes(dataset: Path) -> list:
    return [(e["task"], e["answer"]) if e["task"] == "sound_kind" else None
            for e in read_jsonl(dataset / "train.jsonl")]


def test_class_weights_give_every_class_of_a_label_task_the_same_total_and_keep_the_tasks_share(
        mel_store, tiny_dataset):
    from mellow.manifests import label_tasks_of
    from mellow.model.decoders import load_tokenizer

    store = EmbeddingStore(mel_store)
    examples = ExampleSet.from_split(tiny_dataset, "train", store, load_tokenizer("tiny"), 256)
    weights = examples.class_weights(label_tasks_of(tiny_dataset))
    classes = [_sound_kind_classes(tiny_dataset)[line] for line in examples.tokenized.line]
    labelled = [key for key in classes if key is not None]
    assert len(set(labelled)) >= 3 and len(labelled) < len(classes)  # several kinds, beside other tasks
    totals = {key: sum(w for w, k in zip(weights, classes) if k == key) for key in set(labelled)}
    assert max(totals.values()) == pytest.approx(min(totals.values()))
    assert sum(totals.values()) == pytest.approx(len(labelled))  # the task's share of the data is kept
    assert all(w == 1.0 for w, key in zip(weights, classes) if key is None)
    # the sampler draws an epoch with those weights: every class about as often
    drawn = [classes[i] for epoch in range(40) for i in
             epoch_micro_batches(examples.lengths(), 1, 3, epoch, 1, weights).ravel()]
    counts = [drawn.count(key) for key in set(labelled)]
    assert max(counts) < 1.5 * min(counts), counts


@pytest.mark.parametrize("balance", ["sampler", "loss"])
def test_balanced_training_changes_the_training_and_resumes_exactly(mel_store, tiny_dataset, tmp_path, balance):
    straight, _ = _stop_and_resume_equals_straight(mel_store, tiny_dataset, tmp_path, ModelConfig(**TINY_MODEL),
                                                   balance=balance)
    plain = tmp_path / "plain"
    loop.run(train_config(mel_store, tiny_dataset, plain), ModelConfig(**TINY_MODEL))
    assert logged_losses(plain) != logged_losses(straight)
    with pytest.raises(ValueError, match="balance"):  # a resume cannot switch it: that changes the training
        loop.run(train_config(mel_store, tiny_dataset, straight, max_updates=10), ModelConfig(**TINY_MODEL),
                  resume=True)


def test_balance_without_label_tasks_is_a_clear_error(mel_store, tiny_dataset, tmp_path):
    import shutil

    dataset = tmp_path / "synth"
    shutil.copytree(tiny_dataset, dataset, ignore=shutil.ignore_patterns(".cache"))
    prepared = read_json(dataset / "prepare.json")
    prepared.pop("label_tasks")
    (dataset / "prepare.json").write_text(__import__("json").dumps(prepared))
    with pytest.raises(ValueError, match="declares no closed-label task"):
        loop.run(train_config(mel_store, dataset, tmp_path / "run", balance="sampler"), ModelConfig(**TINY_MODEL))
