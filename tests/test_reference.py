"""The reference trainer is the oracle: check its accumulation, clipping and checkpointing exactly."""

import copy

import pytest
import torch

from fuyou.data import Batch, build_dataset
from fuyou.models import build_model, get_preset
from fuyou.reference import ReferenceTrainer, causal_lm_loss_sum
from fuyou.tokenizer import load_tokenizer

SCHEDULE = dict(lr=1e-3, warmup_steps=2, total_steps=10, min_lr_ratio=0.1, weight_decay=0.1)


def tiny_model(preset="tiny-llama", seed=0, **changes):
    return build_model(get_preset(preset).replace(**changes), device="cpu", dtype=torch.float32, seed=seed)


def random_batch(generator, batch_size, seq_len, vocab_size, mask_first=0):
    ids = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
    labels = ids[:, 1:].clone()
    labels[:, :mask_first] = -100
    return Batch(input_ids=ids[:, :-1].contiguous(), labels=labels)


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt3"])
def test_grad_accumulation_equals_one_large_batch(preset):
    generator = torch.Generator().manual_seed(1)
    vocab = get_preset(preset).vocab_size
    # Different masks per micro-batch: the per-token normalisation over the whole step must hold.
    halves = [random_batch(generator, 2, 16, vocab, mask_first=3), random_batch(generator, 2, 16, vocab, mask_first=9)]
    whole = Batch(
        input_ids=torch.cat([b.input_ids for b in halves]), labels=torch.cat([b.labels for b in halves])
    )
    model_a = tiny_model(preset)
    model_b = copy.deepcopy(model_a)
    trainer_a = ReferenceTrainer(model_a, max_grad_norm=0.5, **SCHEDULE)
    trainer_b = ReferenceTrainer(model_b, max_grad_norm=0.5, **SCHEDULE)
    for _ in range(3):
        result_a = trainer_a.step([whole])
        result_b = trainer_b.step(halves)
        assert result_b.loss == pytest.approx(result_a.loss, rel=1e-6)
        assert result_b.grad_norm == pytest.approx(result_a.grad_norm, rel=1e-5)
        assert result_a.num_target_tokens == result_b.num_target_tokens == 4 * 16 - 2 * 3 - 2 * 9
    # Loss and norm above are the tight checks. Parameters get atol 1e-5 (1% of lr): AdamW divides by
    # sqrt(v) + eps, so a gradient entry near zero (the key bias's exact gradient is zero: a constant
    # added to every key leaves softmax unchanged) has its float32 rounding noise scaled up to an
    # lr-sized step, whichever way the batch is split.
    torch.testing.assert_close(flat_params(model_b), flat_params(model_a), rtol=1e-5, atol=1e-5)


def test_clipping_uses_the_global_norm_and_scales_the_update():
    generator = torch.Generator().manual_seed(2)
    batch = random_batch(generator, 2, 16, 512)
    model = tiny_model()
    # The norm the trainer reports is the L2 norm over all gradients of the step's mean loss.
    probe = copy.deepcopy(model)
    loss = causal_lm_loss_sum(probe(batch.input_ids), batch.labels) / batch.num_target_tokens
    loss.backward()
    expected_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in probe.parameters())).item()
    trainer = ReferenceTrainer(model, max_grad_norm=1e-3, **SCHEDULE)
    result = trainer.step([batch])
    assert result.grad_norm == pytest.approx(expected_norm, rel=1e-5)
    assert result.loss == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("max_grad_norm", [1e-3, 100.0, None], ids=["clipped", "unclipped", "no-clip"])
def test_fused_adamw_takes_the_clip_as_its_grad_scale(max_grad_norm):
    """A fused torch AdamW (the reference's on CUDA; torch has it on the CPU too) gets the clip factor as the
    `grad_scale` its kernel divides gradients by, instead of clip_grad_norm_'s pass: the same steps as the
    for-each AdamW after clip_grad_norm_, to the rounding of a division against a multiplication."""
    from fuyou.reference import adamw_param_groups

    generator = torch.Generator().manual_seed(3)
    batches = [random_batch(generator, 2, 16, 512) for _ in range(3)]
    model = tiny_model()
    results, params = [], []
    for fused in (True, False):
        copy_ = copy.deepcopy(model)
        adamw = torch.optim.AdamW(adamw_param_groups(copy_, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                                  fused=fused, foreach=None if fused else True)
        trainer = ReferenceTrainer(copy_, max_grad_norm=max_grad_norm, optimizer=adamw, **SCHEDULE)
        results.append([trainer.step([batch]) for batch in batches])
        params.append(flat_params(copy_))
        assert getattr(adamw, "grad_scale", None) is None  # nothing left behind for the next step
    for fused_result, plain_result in zip(*results):
        assert fused_result.grad_norm == pytest.approx(plain_result.grad_norm, rel=1e-5)
        assert fused_result.loss == pytest.approx(plain_result.loss, rel=1e-5)
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)
    assert not torch.equal(params[0], flat_params(model))


def test_activation_checkpointing_changes_nothing_numerically():
    generator = torch.Generator().manual_seed(3)
    batches = [random_batch(generator, 2, 16, 512) for _ in range(3)]
    model_a = tiny_model()
    model_b = copy.deepcopy(model_a)
    trainer_a = ReferenceTrainer(model_a, max_grad_norm=1.0, **SCHEDULE)
    trainer_b = ReferenceTrainer(model_b, max_grad_norm=1.0, activation_checkpointing=True, **SCHEDULE)
    for batch in batches:
        assert trainer_b.step([batch]).loss == pytest.approx(trainer_a.step([batch]).loss, rel=1e-6)
    torch.testing.assert_close(flat_params(model_b), flat_params(model_a), rtol=1e-6, atol=1e-7)


def test_weight_decay_skips_vectors():
    model = tiny_model()
    trainer = ReferenceTrainer(model, **SCHEDULE)
    decayed, exempt = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.ndim >= 2 for p in decayed["params"])
    assert exempt["weight_decay"] == 0.0 and all(p.ndim < 2 for p in exempt["params"])
    assert len(decayed["params"]) + len(exempt["params"]) == len(list(model.parameters()))


def test_loss_falls_on_the_synthetic_task():
    torch.manual_seed(0)
    tokenizer = load_tokenizer("byte")
    dataset = build_dataset(source="synthetic", tokenizer=tokenizer, seq_len=64, seed=0)
    batches = dataset.batches(8)
    trainer = ReferenceTrainer(tiny_model(num_layers=2), lr=3e-3, warmup_steps=5, total_steps=60, max_grad_norm=1.0)
    losses = [trainer.step([next(batches)]).loss for _ in range(60)]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


@pytest.mark.gpu
def test_bf16_autocast_on_the_gpu_tracks_fp32():
    generator = torch.Generator().manual_seed(4)
    batches = [random_batch(generator, 4, 64, 512) for _ in range(20)]
    model_fp32 = tiny_model().cuda()
    model_bf16 = copy.deepcopy(model_fp32)
    trainer_fp32 = ReferenceTrainer(model_fp32, max_grad_norm=1.0, **SCHEDULE)
    trainer_bf16 = ReferenceTrainer(model_bf16, max_grad_norm=1.0, precision="bf16", **SCHEDULE)
    for batch in batches:
        loss_fp32 = trainer_fp32.step([batch]).loss
        loss_bf16 = trainer_bf16.step([batch]).loss
        assert loss_bf16 == pytest.approx(loss_fp32, rel=2e-2)
    assert next(model_bf16.parameters()).dtype == torch.float32  # master weights stay fp32
