"""Session 20 adversarial review of crossent.integrations.transformers (``patch``,
``unpatch``, ``is_patched``): the module docstring's promises where the other files do not
look. Tiny models built from configs (nothing downloaded). References: the same model
unpatched (transformers' ``ForCausalLMLoss``) or, for float64, its own modules with
``torch.nn.functional.cross_entropy`` in float64.
"""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_models import SEQ, VOCAB, make  # noqa: E402

from crossent import UnsupportedError  # noqa: E402
from crossent.integrations import transformers as xhf  # noqa: E402


def ids(seed=1, rows=3, vocab=VOCAB):
    return torch.randint(0, vocab, (rows, SEQ), generator=torch.Generator().manual_seed(seed))


def step(model, **kwargs):
    """(loss, {name: gradient or None}) of one training step."""
    model.zero_grad()
    loss = model(**kwargs).loss
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone()
                           for n, p in model.named_parameters()}


def assert_same_step(want, got, **tol):
    torch.testing.assert_close(got[0], want[0], equal_nan=True, **tol)
    assert want[1].keys() == got[1].keys()
    for name, grad in want[1].items():
        assert (grad is None) == (got[1][name] is None), name
        if grad is not None:
            torch.testing.assert_close(got[1][name], grad, equal_nan=True, **tol,
                                       msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------- hooks the fused path skips


@pytest.mark.parametrize("kind", ["full_backward_hook", "full_backward_pre_hook"])
def test_backward_hooks_on_the_lm_head_fire_or_are_refused(kind):
    """Fixed at stop 29; the repro was: ``m = patch(LlamaForCausalLM(cfg)).train();
    m.lm_head.register_full_backward_hook(f); m(input_ids=x, labels=x).loss.backward()``:
    unpatched, ``f`` gets dL/dlogits; patched, ``f`` is silently never called. The
    docstring promises UnsupportedError for "an LM head that ... carries hooks"."""
    ref = make()
    ours = xhf.patch(copy.deepcopy(ref))
    fired = []
    for name, model in (("ref", ref), ("ours", ours)):
        getattr(model.lm_head, f"register_{kind}")(lambda *a, n=name: fired.append(n))
    data = {"input_ids": ids(), "labels": ids()}
    ref(**data).loss.backward()
    assert fired == ["ref"]  # the reference does call it
    try:
        ours(**data).loss.backward()
    except UnsupportedError as e:
        assert "hook" in str(e)
    else:
        assert "ours" in fired, "lm_head's backward hook silently skipped"


def test_global_module_forward_hooks_see_the_head_or_are_refused():
    """Fixed at stop 29; the repro was:
    ``h = torch.nn.modules.module.register_module_forward_hook(f)``; the
    unpatched training step calls ``f(lm_head, ...)`` once, the patched one never (and
    does not raise)."""
    ref = make()
    ours = xhf.patch(copy.deepcopy(ref))
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(module)
        if isinstance(module, torch.nn.Linear) and module.out_features == VOCAB else None)
    data = {"input_ids": ids(), "labels": ids()}
    try:
        ref(**data)
        assert seen == [ref.lm_head]
        try:
            ours(**data)
        except UnsupportedError as e:
            assert "hook" in str(e)
        else:
            assert seen[1:] == [ours.lm_head], "the global hook never saw the patched head"
    finally:
        handle.remove()


# ---------------------------------------------------------------- class patches and subclasses


def test_unpatching_a_subclass_falls_back_to_its_patched_parent():
    """Fixed at stop 29; the repro was:
    ``class Sub(LlamaForCausalLM): pass; patch(LlamaForCausalLM); patch(Sub);
    unpatch(Sub)`` -> ``is_patched(Sub)`` is False (expected True, as an instance falls back
    to its class's patch); then ``unpatch(LlamaForCausalLM); patch(LlamaForCausalLM)`` ->
    ``is_patched(Sub)`` still False, ``'forward' in vars(Sub)``: "every instance, present and
    future, is patched" fails for Sub's instances."""
    parent = transformers.LlamaForCausalLM
    original = parent.forward

    class Sub(parent):
        pass

    try:
        assert xhf.patch(parent) is parent and xhf.is_patched(Sub)
        xhf.patch(Sub, chunk_size=3)
        xhf.unpatch(Sub)
        assert "forward" not in vars(Sub)
        assert xhf.is_patched(Sub)  # the parent's patch, as before patch(Sub)
        xhf.unpatch(parent)
        xhf.patch(parent)
        assert xhf.is_patched(Sub)
    finally:
        xhf.unpatch(parent)
    assert parent.forward is original


def test_class_patch_survives_pickle_and_deepcopy_of_instances_until_unpatched():
    import pickle

    cls = transformers.Qwen2ForCausalLM
    original = cls.forward
    model = make("Qwen2Config", "Qwen2ForCausalLM")
    ref = copy.deepcopy(model)
    data = {"input_ids": ids(), "labels": ids()}
    try:
        xhf.patch(cls, chunk_size=3)
        clones = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
        for clone in clones:
            assert xhf.is_patched(clone) and "forward" not in vars(clone)
            out = clone(**data)
            assert out.logits is None
            torch.testing.assert_close(out.loss, original(ref, **data).loss)
        xhf.unpatch(cls)
        assert all(not xhf.is_patched(c) and c(**data).logits is not None for c in clones)
    finally:
        xhf.unpatch(cls)
    assert cls.forward is original


# ---------------------------------------------------------------- float64: the exact loss


FLOAT64 = {  # name: (config, model, extra config, chunk_size, head with bias)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, None, False),
    "gemma2-softcap-tied": ("Gemma2Config", "Gemma2ForCausalLM",
                            {"head_dim": 8, "final_logit_softcapping": 0.5}, 4, False),
    "gemma3-softcap": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                       {"head_dim": 8, "final_logit_softcapping": 2.0}, None, False),
    "qwen3-bias": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}, 4, True),
}


@pytest.mark.parametrize("case", list(FLOAT64))
def test_float64_model_loss_and_gradients_are_the_float64_ones(case):
    """Docstring: "a float64 model's loss is computed in float64 before the rounding to
    float32". transformers' own loss is float32 for a float64 model (``.float()``), as
    ours; every gradient must be the float64 one of h W^T + b -> softcap -> CE (not a
    float32 rounding), and the loss that float64 value rounded."""
    config_name, model_name, extra, chunk, bias = FLOAT64[case]
    ref = make(config_name, model_name, **extra)
    if bias:
        torch.manual_seed(3)
        ref.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    ref = ref.double()
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=chunk)
    labels = ids(seed=4)
    labels[0, :3] = -100
    mask = torch.ones_like(labels)
    mask[2, -2:] = 0
    labels[2, -2:] = -100
    data = {"input_ids": ids(), "attention_mask": mask, "labels": labels}
    assert ref(**data).loss.dtype == torch.float32  # transformers' dtype
    ref.zero_grad()
    hidden = ref.model(input_ids=data["input_ids"], attention_mask=mask).last_hidden_state
    z = ref.lm_head(hidden)
    cap = getattr(ref.config, "final_logit_softcapping", None)
    if cap is not None and model_name in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        z = cap * torch.tanh(z / cap)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    exact = torch.nn.functional.cross_entropy(z.reshape(-1, VOCAB), shifted.reshape(-1))
    assert exact.dtype == torch.float64
    exact.backward()
    want = {n: p.grad.clone() for n, p in ref.named_parameters()}
    loss, grads = step(ours, **data)
    assert loss.dtype == torch.float32
    assert abs(loss.double().item() - exact.item()) <= 2**-24 * abs(exact.item())
    for name, g in want.items():
        assert grads[name].dtype == torch.float64, name
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-13, msg=name)


# ---------------------------------------------------------------- call forms


def test_deprecated_past_key_values_name_and_cache_position_continue_the_cache():
    """``past_key_values=`` (renamed ``cache`` in transformers 5, still accepted with a
    FutureWarning) and an explicit ``cache_position``: the continuation's loss is the
    unpatched one (and not the loss without the cached prefix)."""
    ref = make("MistralConfig", "MistralForCausalLM", sliding_window=5)
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=4)
    x = ids()
    with torch.no_grad():
        prefix = ref(input_ids=x[:, :6], use_cache=True)
    cache = prefix["cache"] if "cache" in prefix else prefix["past_key_values"]
    data = {"input_ids": x[:, 6:], "labels": x[:, 6:]}
    no_prefix = ref(**data).loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for extra in ({}, {"cache_position": torch.arange(6, SEQ)}):
            want = step(ref, **data, past_key_values=copy.deepcopy(cache), **extra)
            got = step(ours, **data, past_key_values=copy.deepcopy(cache), **extra)
            assert_same_step(want, got)
            assert abs(got[0].item() - no_prefix.item()) > 1e-3  # the prefix mattered


def test_return_dict_false_tuple_values_with_hidden_states_and_attentions():
    ref = make(attn_implementation="eager")
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=4)
    data = {"input_ids": ids(), "labels": ids(), "return_dict": False,
            "output_hidden_states": True, "output_attentions": True}
    for use_cache in (False, True):
        a, b = ref(**data, use_cache=use_cache), ours(**data, use_cache=use_cache)
        assert isinstance(b, tuple) and len(b) == len(a) and b[1] is None
        torch.testing.assert_close(b[0], a[0])
        for x, y in zip(b[2:], a[2:], strict=True):
            assert type(x) is type(y)
            if isinstance(y, tuple):  # hidden states, attentions
                assert len(x) == len(y)
                for u, v in zip(x, y, strict=True):
                    torch.testing.assert_close(u, v)


def test_positional_labels_dropout_rng_and_inputs_embeds_gradient():
    """labels passed positionally (6th argument); attention dropout in train mode draws the
    same random numbers (same seed, same loss); the gradient reaches inputs_embeds."""
    ref = make(attention_dropout=0.5)
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=4)
    x = ids()
    losses = []
    for model in (ref, ours):
        torch.manual_seed(5)
        losses.append(model(x, None, None, None, None, x).loss)
    torch.testing.assert_close(losses[1], losses[0])
    torch.manual_seed(6)
    assert abs(ours(x, None, None, None, None, x).loss.item() - losses[0].item()) > 1e-4
    embeds = torch.randn(3, SEQ, 32, generator=torch.Generator().manual_seed(3))
    grads = []
    for model in (ref.eval(), ours):  # no dropout, fused path in eval: in_eval
        e = embeds.clone().requires_grad_()
        if model is ours:
            model = xhf.patch(model.eval(), in_eval=True)
        out = model(inputs_embeds=e, labels=x)
        out.loss.backward()
        grads.append(e.grad)
    assert out.logits is None
    torch.testing.assert_close(grads[1], grads[0])


# ---------------------------------------------------------------- vocabulary changes


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings_after_patch(tied):
    """``resize_token_embeddings`` after ``patch`` (new rows, config.vocab_size updated):
    labels in the new rows count; loss and every gradient as the unpatched model."""
    ours = xhf.patch(make(tie_word_embeddings=tied), chunk_size=5)
    ours.resize_token_embeddings(120, pad_to_multiple_of=64, mean_resizing=False)
    vocab = ours.config.vocab_size
    assert vocab == 128 and ours.lm_head.weight.shape[0] == vocab and xhf.is_patched(ours)
    ref = xhf.unpatch(copy.deepcopy(ours))  # the same new rows
    assert not xhf.is_patched(ref)
    x = ids(vocab=vocab)
    labels = x.clone()
    labels[1, 4] = vocab - 1  # a new id
    data = {"input_ids": x, "labels": labels}
    assert_same_step(step(ref, **data), step(ours, **data))
    if tied:
        assert ours.lm_head.weight is ours.get_input_embeddings().weight


# ---------------------------------------------------------------- labels and counts


def test_labels_below_ignore_index_and_narrow_out_of_range_raise_index_error():
    """-101 and -200 are neither ignored nor ids: IndexError as transformers. Narrow dtypes
    (which transformers refuses with a RuntimeError) out of range: IndexError, never a
    silent wrap to -100."""
    ref = make()
    ours = xhf.patch(copy.deepcopy(ref))
    for bad in (-101, -200):
        labels = ids()
        labels[0, 3] = bad
        for model in (ref, ours):
            with pytest.raises(IndexError):
                model(input_ids=ids(), labels=labels)
    for bad, dtype in ((255, torch.uint8), (300, torch.int16), (-101, torch.int16),
                       (-1, torch.int8), (156, torch.uint8)):  # 156: -100 as int8
        labels = ids()
        labels[0, 3] = bad
        with pytest.raises(IndexError):
            ours(input_ids=ids(), labels=labels.to(dtype))


def test_uint8_shift_labels_id_156_is_an_id_not_minus_100():
    """uint8 shift_labels: 156 is -100 mod 256, but it is a token id (vocabulary of 200)."""
    ref = make(vocab_size=200)
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=4)
    x = ids(vocab=200)
    shift = x.clone()
    shift[:, ::2] = 156
    want = step(ref, input_ids=x, labels=x, shift_labels=shift)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert_same_step(want, step(ours, input_ids=x, labels=x, shift_labels=shift.to(dtype)))


@pytest.mark.parametrize("count", [0, torch.tensor(0), torch.tensor([0]),
                                   torch.tensor(0.0, dtype=torch.float16),
                                   torch.tensor(5, dtype=torch.uint8)],
                         ids=["int-0", "0d-0", "shape1-0", "float16-0", "uint8-5"])
def test_num_items_in_batch_zero_and_narrow_with_counted_tokens(count):
    """A count of 0 with counted tokens: transformers' sum / 0 = inf (NaN gradients), the
    shape of a (1,) count kept; a uint8 count divides as transformers'."""
    ref = make()
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=4)
    data = {"input_ids": ids(), "labels": ids(), "num_items_in_batch": count}
    want, got = step(ref, **data), step(ours, **data)
    assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
    assert_same_step(want, got)


def test_sequence_length_one_with_a_count_is_zero_with_zero_gradients():
    """One token per sequence with the Trainer's count: nothing counted, 0 / n = 0, every
    gradient zero (not None, not NaN), as transformers."""
    ref = make("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, final_logit_softcapping=0.5)
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=4)
    data = {"input_ids": ids()[:, :1], "labels": ids()[:, :1], "num_items_in_batch": 5}
    want, got = step(ref, **data), step(ours, **data)
    assert want[0].item() == 0.0
    assert_same_step(want, got)
