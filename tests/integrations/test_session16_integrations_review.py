"""Session 16 trust round: crossent.integrations.transformers as a Hugging Face user and
the Trainer probe it, where the feature and adversarial files do not look.

Tiny models built from configs (nothing downloaded). The reference is the same model
unpatched: transformers' own ``ForCausalLMLoss`` on its logits, and its gradients.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_models import SEQ, VOCAB, make  # noqa: E402

from crossent import InputError, UnsupportedError  # noqa: E402
from crossent.integrations import transformers as xhf  # noqa: E402


def batch(seed: int = 1, rows: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[-1, -2:] = -100  # padding
    return {"input_ids": ids, "labels": labels}


def step(model, **kwargs):
    """(loss, output, {name: gradient or None}) of one training step."""
    model.zero_grad()
    out = model(**kwargs)
    out.loss.backward()
    return out.loss.detach(), out, {n: None if p.grad is None else p.grad.clone()
                                    for n, p in model.named_parameters()}


def assert_same_step(want, got, rtol=None, atol=None):
    loss_a, _, grads_a = want
    loss_b, out_b, grads_b = got
    assert out_b.logits is None
    assert loss_b.dtype == loss_a.dtype and loss_b.shape == loss_a.shape
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=atol, equal_nan=True)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert (grad is None) == (grads_b[name] is None), name
        if grad is not None:
            assert grads_b[name].dtype == grad.dtype, name
            torch.testing.assert_close(grads_b[name], grad, rtol=rtol, atol=atol,
                                       msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------- what can be patched


@pytest.mark.parametrize("head", ["LlamaForSequenceClassification",
                                  "LlamaForTokenClassification",
                                  "LlamaForQuestionAnswering", "LlamaModel"])
def test_heads_other_than_causal_lm_are_refused_by_name(head):
    """Only the causal-LM classes are claimed; every other head of a supported family
    (its loss is not ForCausalLMLoss) is refused naming the class, instance and class."""
    model = make("LlamaConfig", head)
    with pytest.raises(UnsupportedError, match=head):
        xhf.patch(model)
    with pytest.raises(UnsupportedError, match=head):
        xhf.patch(getattr(transformers, head))
    assert not xhf.is_patched(model)


# ---------------------------------------------------------------- dtypes


def test_float16_model_loss_equals_transformers_and_gradients_as_accurate():
    """A float16 model: transformers upcasts the float16 logits to a float32 loss (equal
    here); its float16 gradients round the logits' gradient to float16 where crossent's
    chunks keep it in float32, so each gradient is compared with the float64 model's:
    crossent's error at most transformers' (plus a float16 ulp of slack)."""
    base = make("LlamaConfig", "LlamaForCausalLM")
    ref = copy.deepcopy(base).half()
    ours = xhf.patch(copy.deepcopy(base).half(), chunk_size=4)
    exact = copy.deepcopy(ref).double()
    data = batch()
    (loss_a, _, grads_a), (loss_b, out_b, grads_b) = step(ref, **data), step(ours, **data)
    _, _, grads_64 = step(exact, **data)
    assert out_b.logits is None and loss_b.dtype == loss_a.dtype == torch.float32
    torch.testing.assert_close(loss_b, loss_a)
    for name, want in grads_64.items():
        assert grads_b[name].dtype == grads_a[name].dtype == torch.float16, name
        theirs = float((grads_a[name].double() - want).abs().max())
        mine = float((grads_b[name].double() - want).abs().max())
        assert mine <= theirs + 2**-11 * float(want.abs().max()), (name, mine, theirs)


def test_gemma2_default_config_softcap_and_trainer_count_in_bfloat16():
    """Gemma 2's default config caps at 30.0 (the tests elsewhere set 0.5): float32 equal
    to transformers, bfloat16 within the documented bfloat16 rounding of its cap, with
    the Trainer's ``num_items_in_batch`` tensor."""
    ref = make("Gemma2Config", "Gemma2ForCausalLM", head_dim=8)
    assert ref.config.final_logit_softcapping == 30.0
    with torch.no_grad():  # logits well past the cap's linear range
        ref.lm_head.weight.mul_(10.0)
    data = {**batch(), "num_items_in_batch": torch.tensor(19)}
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=4)
    assert_same_step(step(ref, **data), step(ours, **data))
    unc = copy.deepcopy(ref)
    unc.config.final_logit_softcapping = None  # the cap does change this loss
    assert abs(unc(**data).loss.item() - ref(**data).loss.item()) > 1e-2
    ref, ours = ref.bfloat16(), ours.bfloat16()
    a, b = ref(**data).loss, ours(**data).loss
    assert a.dtype == b.dtype == torch.float32
    assert abs(b.item() - a.item()) <= 2**-8 * abs(a.item())


def test_autocast_bfloat16_body_with_float32_head_as_transformers():
    ref = make("LlamaConfig", "LlamaForCausalLM").bfloat16()
    ref.lm_head.float()
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=4)
    data = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = step(ref, **data)
        got = step(ours, **data)
    assert_same_step(want, got, rtol=2e-2, atol=1e-3)


def test_negative_final_logit_softcapping_gives_transformers_loss_or_names_the_config():
    ref = make("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, final_logit_softcapping=-2.0)
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=4)
    data = batch()
    want = step(ref, **data)
    try:
        got = step(ours, **data)
    except (InputError, UnsupportedError) as e:
        assert "final_logit_softcapping" in str(e)
    else:
        assert_same_step(want, got)


# ---------------------------------------------------------------- the Trainer's count


@pytest.mark.parametrize("count", [torch.tensor([19]), torch.tensor(19, dtype=torch.int32),
                                   torch.tensor(19.0, dtype=torch.float64), 19.0],
                         ids=["shape-(1,)", "int32", "float64-0d", "python-float"])
def test_num_items_in_batch_forms_as_transformers(count):
    """The forms trainers pass: a gathered (1,) tensor, int32, float64 (whose 0-d
    division promotes the loss to float64 in transformers), a Python float."""
    ref = make("LlamaConfig", "LlamaForCausalLM")
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=4)
    data = {**batch(), "num_items_in_batch": count}
    # float32 sums (a float64 count promotes only the division): float32 tolerances
    assert_same_step(step(ref, **data), step(ours, **data), rtol=1.3e-6, atol=1e-5)


def test_logits_to_keep_index_tensor():
    ref = make("MistralConfig", "MistralForCausalLM", sliding_window=4)
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=2)
    data = batch()
    keep = torch.tensor([1, 4, 7, 9])
    data = {"input_ids": data["input_ids"], "labels": data["labels"][:, keep],
            "logits_to_keep": keep}
    assert_same_step(step(ref, **data), step(ours, **data))


def test_train_eval_train_loop_with_an_optimizer_equals_transformers():
    """A Trainer-like loop: train steps (fused), an evaluation in eval() under no_grad
    (the model's own forward: logits and loss), train again; SGD with momentum on both;
    every parameter equal after the loop."""
    ref = make("Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=True)
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=3)
    opts = [torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9) for m in (ref, ours)]
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    for i, mode in enumerate(["train", "eval", "train"]):
        data = batch(seed=10 + i)
        for model in (ref, ours):
            getattr(model, mode)()
        if mode == "eval":
            with torch.no_grad():
                a, b = ref(**data), ours(**data)
            assert b.logits is not None
            torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
            continue
        assert_same_step(step(ref, **data), step(ours, **data), rtol=1e-5, atol=1e-6)
        for opt in opts:
            opt.step()
    mine = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(mine[name], p, rtol=1e-5, atol=1e-6, msg=name)
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in ref.named_parameters())
    assert moved > 1e-3  # the loop did train


def test_torch_func_grad_of_functional_call_on_the_patched_model():
    """``torch.func.grad`` over ``functional_call(model, params, ...)`` (meta-learning,
    per-parameter-set losses): the patched forward reads the swapped parameters and gives
    the unpatched model's gradient for every one."""
    from torch.func import functional_call, grad

    ref = make("LlamaConfig", "LlamaForCausalLM")
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=4)
    params = {n: p.detach() * 1.5 for n, p in ref.named_parameters()}  # not the model's own
    data = batch()

    def loss_of(model):
        return lambda p: functional_call(model, p, (), data).loss

    want, got = grad(loss_of(ref))(params), grad(loss_of(ours))(params)
    assert want.keys() == got.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, msg=name)
