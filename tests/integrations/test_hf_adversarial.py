"""Adversarial review of crossent.integrations.transformers: what a user of the Hugging
Face stack tries that the feature tests do not. Tiny models from configs (no downloads);
the reference is the same model unpatched (transformers' ``ForCausalLMLoss``)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from crossent.integrations import transformers as xhf  # noqa: E402

VOCAB, SEQ = 97, 10


@pytest.fixture(scope="module")
def llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # informative logits
    return model


def ids(seed=1, batch=3):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def step(model, **batch):
    """loss and every parameter's gradient (None where none)"""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): None if p.grad is None
                           else p.grad.clone() for n, p in model.named_parameters()}


def assert_same_step(a, b):
    torch.testing.assert_close(b[0], a[0], equal_nan=True)
    for name, grad in a[1].items():
        assert (grad is None) == (b[1][name] is None), name
        if grad is not None:
            torch.testing.assert_close(b[1][name], grad, equal_nan=True,
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_nothing_counted_gradients_match_transformers(llama):
    """Every label -100: transformers' mean of nothing is NaN (NaN gradients), with the
    Trainer's count it is 0 / n = 0 (zero gradients); the fused loss matches both."""
    ours = xhf.patch(copy.deepcopy(llama), chunk_size=4)
    none = torch.full((3, SEQ), -100)
    for extra in ({}, {"num_items_in_batch": torch.tensor(7)}, {"num_items_in_batch": 7}):
        batch = {"input_ids": ids(), "labels": none, **extra}
        assert_same_step(step(llama, **batch), step(ours, **batch))


def test_token_ids_out_of_range_raise_index_error_as_transformers(llama):
    ours = xhf.patch(copy.deepcopy(llama))
    for bad in (-1, VOCAB):
        labels = ids()
        labels[0, 3] = bad
        for model in (llama, ours):
            with pytest.raises(IndexError):
                model(input_ids=ids(), labels=labels)


def test_gradient_accumulation_uneven_micro_batches_with_custom_ignore_index(llama):
    """Two micro-batches of different sizes and token counts, each divided by the whole
    batch's count (a Python int, as some trainers pass it), with ignore_index=5 passed
    through the model's kwargs: the sum of micro-batch gradients is the full batch's."""
    ours = xhf.patch(copy.deepcopy(llama), chunk_size=3)
    full = ids(seed=2, batch=4)
    labels = full.clone()
    labels[0, :6] = 5
    labels[3, 2:] = 5
    full_step = step(llama, input_ids=full, labels=labels, ignore_index=5)
    count = int((labels[:, 1:] != 5).sum())
    ours.zero_grad()
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        loss = ours(input_ids=full[rows], labels=labels[rows], ignore_index=5,
                    num_items_in_batch=count).loss
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full_step[0].item(), rel=1e-5)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, full_step[1][name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_causal_lm_loss_on_gpt2_hidden_states():
    """GPT-2 cannot be patched (UnsupportedError), but :func:`causal_lm_loss` on its final
    hidden states and tied head gives its own loss and gradients."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).train()
    with pytest.raises(xhf.UnsupportedError, match="GPT2LMHeadModel"):
        xhf.patch(model)
    labels = ids()
    labels[1, 5:] = -100
    out = model(input_ids=ids(), labels=labels, output_hidden_states=True)
    mine = xhf.causal_lm_loss(out.hidden_states[-1], model.lm_head.weight, labels,
                              chunk_size=4, num_items_in_batch=None)
    torch.testing.assert_close(mine, out.loss)
    params = [model.lm_head.weight, model.transformer.h[0].mlp.c_fc.weight]
    want = torch.autograd.grad(out.loss, params, retain_graph=True)
    got = torch.autograd.grad(mine, params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_compiled_patched_model_is_one_graph_with_transformers_gradients(llama):
    """torch.compile(patched model, fullgraph=True): the patched forward imported
    transformers modules on every call (importlib.import_module: a graph break, so
    fullgraph=True raised); the loss and gradients must be the unpatched model's."""
    ours = xhf.patch(copy.deepcopy(llama), chunk_size=5)
    batch = {"input_ids": ids(), "labels": ids()}
    batch["labels"][0, :4] = -100
    # backend "eager": dynamo's graph capture is what broke; AOT tracing adds only time
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    assert_same_step(step(llama, **batch), step(compiled, **batch))
    torch._dynamo.reset()
