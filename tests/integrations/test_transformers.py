"""crossent.integrations.transformers against transformers' own causal-LM loss.

Tiny random models built from configs (nothing is downloaded), one per supported family;
the reference is the same model unpatched (transformers' ForCausalLMLoss on its logits).
"""

from __future__ import annotations

import copy
import inspect
import os
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from crossent import InputError, UnsupportedError  # noqa: E402
from crossent.integrations import transformers as xhf  # noqa: E402

VOCAB = 97
BATCH, SEQ = 4, 12
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64}
# family: (config class, model class, extra config); Gemma ties its embeddings by default
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 8, "final_logit_softcapping": 0.5, "sliding_window": 5}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 8, "final_logit_softcapping": 0.5, "sliding_window": 5}),
}


def make_model(family: str, seed: int = 0):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**COMMON, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).train()
    with torch.no_grad():  # random init leaves near-uniform logits; make them informative
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def make_batch(seed: int = 1, batch: int = BATCH):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    labels = ids.clone()
    prompt = torch.randint(0, SEQ, (batch,), generator=g)
    labels[torch.arange(SEQ) < prompt[:, None]] = -100  # prompt-masked SFT rows
    attention_mask = torch.ones_like(ids)
    attention_mask[0, -3:] = 0  # right padding, its labels ignored
    labels[0, -3:] = -100
    return {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}


def _no_logits(*args, **kwargs):
    raise AssertionError("the LM head's forward ran: logits were built")


def assert_same_training_step(ref, ours, batch, **kwargs):
    a = ref(**batch, **kwargs)
    b = ours(**batch, **kwargs)
    assert b.logits is None
    assert b.loss.dtype == a.loss.dtype and b.loss.shape == a.loss.shape
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    named = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(named[name].grad, p.grad, msg=lambda m, n=name: f"{n}: {m}")
    return a, b


@pytest.mark.parametrize(("family", "chunk_size"),
                         [("llama", None)] + [(f, 5) for f in FAMILIES])
def test_loss_and_every_gradient_equal_transformers(family, chunk_size):
    ref = make_model(family)
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=chunk_size)
    ours.get_output_embeddings().forward = _no_logits
    assert xhf.is_patched(ours) and not xhf.is_patched(ref)
    a, b = assert_same_training_step(ref, ours, make_batch())
    assert [k for k in b.keys() if k != "loss"] == [k for k in a.keys()
                                                   if k not in ("loss", "logits")]
    if FAMILIES[family][2].get("final_logit_softcapping"):  # the cap matters here
        unc = copy.deepcopy(ref)
        unc.config.final_logit_softcapping = None
        assert abs(unc(**make_batch()).loss.item() - a.loss.item()) > 1e-2
    if ref.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.get_input_embeddings().weight


def test_inference_and_generation_untouched():
    ref = make_model("gemma2").eval()
    ours = xhf.patch(copy.deepcopy(ref))
    batch = make_batch()
    with torch.no_grad():
        a = ref(input_ids=batch["input_ids"])
        b = ours(input_ids=batch["input_ids"])
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
        # eval mode with labels (the Trainer's evaluation): logits and loss as before
        a = ref(**batch)
        b = ours(**batch)
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
        torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
        prompt = batch["input_ids"][:2, :4]
        kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(ours.generate(prompt, **kw), ref.generate(prompt, **kw))
        # generate() in train mode (no labels: the model's own forward), padded prompts too
        ours.train()
        ref.train()
        mask = torch.ones_like(prompt)
        mask[1, 0] = 0
        for extra in ({}, {"attention_mask": mask}):
            assert torch.equal(ours.generate(prompt, **kw, **extra),
                               ref.generate(prompt, **kw, **extra))
        ref.eval()
    # in_eval=True takes the fused path with labels in eval mode too
    fused = xhf.patch(copy.deepcopy(ref), in_eval=True)
    out = fused(**batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss, a.loss)


def _packed(batch):
    # two documents per row, positions restarting at each, the boundary label ignored
    position_ids = torch.cat([torch.arange(5), torch.arange(SEQ - 5)]).expand(BATCH, SEQ)
    labels = batch["input_ids"].clone()
    labels[:, 5] = -100
    return {"input_ids": batch["input_ids"], "position_ids": position_ids, "labels": labels}


def _left_padded(batch):
    mask = torch.ones_like(batch["input_ids"])
    mask[1, :4] = 0
    labels = batch["input_ids"].clone()
    labels[1, :4] = -100
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "labels": labels}


def _embeddings():
    return torch.randn(BATCH, SEQ, COMMON["hidden_size"],
                       generator=torch.Generator().manual_seed(5))


INPUTS = {  # name: the batch -> the keyword arguments of the call (labels included)
    "left-padding": _left_padded,
    "packed-sequences": _packed,
    "inputs_embeds": lambda b: {"inputs_embeds": _embeddings(), "labels": b["labels"]},
    "batch1-seq2": lambda b: {"input_ids": b["input_ids"][:1, :2],
                              "labels": b["input_ids"][:1, :2]},
    "use_cache": lambda b: {**b, "use_cache": True},
    "output_hidden_states": lambda b: {**b, "output_hidden_states": True},
    "output_attentions": lambda b: {**b, "output_attentions": True},
    "positional": lambda b: {"args": (b["input_ids"], b["attention_mask"]),
                             "labels": b["labels"]},
    "shape-(1,B,T)-labels": lambda b: {**b, "labels": b["labels"][None]},
}


@pytest.mark.parametrize("case", list(INPUTS))
def test_inputs_match_transformers(case):
    ref = make_model("llama")
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=5)
    ours.get_output_embeddings().forward = _no_logits
    kwargs = INPUTS[case](make_batch())
    args = kwargs.pop("args", ())
    a, b = ref(*args, **kwargs), ours(*args, **kwargs)
    assert b.logits is None and b.loss.dtype == a.loss.dtype == torch.float32
    torch.testing.assert_close(b.loss, a.loss)
    assert list(b.keys()) == [k for k in a.keys() if k != "logits"]
    for key in ("hidden_states", "attentions"):
        if key in a:
            for x, y in zip(b[key], a[key], strict=True):
                torch.testing.assert_close(x, y)
    a.loss.backward()
    b.loss.backward()
    named = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(named[name].grad, p.grad, msg=lambda m, n=name: f"{n}: {m}")


def test_labels_nothing_counted_narrow_ints_and_no_grad():
    ref = make_model("llama")
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=5)
    batch = make_batch()
    # nothing counted (all -100, or one token per sequence): NaN as transformers' 0 / 0
    for kwargs in ({**batch, "labels": torch.full_like(batch["labels"], -100)},
                   {"input_ids": batch["input_ids"][:1, :1],
                    "labels": batch["input_ids"][:1, :1]},
                   {**batch, "labels": torch.full_like(batch["labels"], -100),
                    "num_items_in_batch": torch.tensor(0)}):
        a, b = ref(**kwargs).loss, ours(**kwargs).loss
        assert a.isnan() and b.isnan() and b.dtype == a.dtype
    # int32 / int16 / uint8 labels (transformers raises for them): the int64 labels' loss
    # (uint8 cannot hold -100: none ignored here)
    expected = ref(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    for dtype in (torch.int32, torch.int16, torch.uint8):
        got = ours(input_ids=batch["input_ids"], labels=batch["input_ids"].to(dtype)).loss
        torch.testing.assert_close(got, expected)
    narrow = ours(**{**batch, "labels": batch["labels"].int()}).loss
    torch.testing.assert_close(narrow, ref(**batch).loss)
    # train mode under no_grad / inference_mode: the same loss, no graph
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            a, b = ref(**batch).loss, ours(**batch).loss
        assert not b.requires_grad
        torch.testing.assert_close(b, a)
    # eval() with labels: the model's own forward (logits and loss)
    ours.eval()
    ref.eval()
    b = ours(**batch)
    assert b.logits is not None
    torch.testing.assert_close(b.loss, ref(**batch).loss, rtol=0, atol=0)


def test_bad_labels_raise_naming_labels():
    ours = xhf.patch(make_model("llama"))
    batch = make_batch()
    for bad in (batch["labels"].float(), batch["labels"] > 0, batch["labels"][:, :-1]):
        with pytest.raises(InputError, match="labels"):
            ours(**{**batch, "labels": bad})
    with pytest.raises(InputError, match="shift_labels"):
        ours(**batch, shift_labels=batch["labels"].double())
    with pytest.raises(IndexError):  # as torch: an id outside the vocabulary
        ours(**{**batch, "labels": batch["labels"].clamp(min=0) + VOCAB})


def test_cache_continuation_with_labels():
    """Labels for the tokens after a cached prefix (past key values given)."""
    ref = make_model("mistral")
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=5)
    ids = make_batch()["input_ids"]
    with torch.no_grad():
        prefix = ref(input_ids=ids[:, :7], use_cache=True)
    cache_key = "cache" if "cache" in prefix else "past_key_values"
    kwargs = {"input_ids": ids[:, 7:], "labels": ids[:, 7:]}
    a = ref(**kwargs, **{cache_key: copy.deepcopy(prefix[cache_key])}).loss
    b = ours(**kwargs, **{cache_key: copy.deepcopy(prefix[cache_key])}).loss
    torch.testing.assert_close(b, a)


def test_softcap_only_where_the_family_applies_it_and_head_bias():
    # Llama ignores a final_logit_softcapping its config happens to carry; so must we
    ref = make_model("llama")
    ref.config.final_logit_softcapping = 0.5
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=5)
    assert_same_training_step(ref, ours, make_batch())
    # an LM head with a bias (a plain nn.Linear): the bias is in the logits and gets its
    # gradient; a frozen head gets none, the hidden states still do
    ref = make_model("qwen3")
    torch.manual_seed(3)
    ref.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=5)
    assert_same_training_step(ref, ours, make_batch())
    assert ours.lm_head.bias.grad.abs().sum() > 0
    ref = make_model("gemma2")
    ref.lm_head.weight.requires_grad_(False)  # tied: the embedding is frozen too
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=5)
    assert_same_training_step(ref, ours, make_batch())
    assert ours.lm_head.weight.grad is None


def test_bfloat16_loss_is_float32_and_equals_transformers():
    """transformers upcasts the logits (``.float()``): its loss is float32 for a bfloat16
    model, computed from the same bfloat16 logits as crossent's, so the two are equal."""
    ref = make_model("llama").to(torch.bfloat16)
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=5)
    batch = make_batch()
    a, b = ref(**batch), ours(**batch)
    assert a.loss.dtype == b.loss.dtype == torch.float32
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    named = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        assert named[name].grad.dtype == torch.bfloat16
        torch.testing.assert_close(named[name].grad, p.grad, rtol=2**-6, atol=1e-3, msg=name)
    # under autocast a float32 model's head runs in bfloat16 and both losses are float32
    ref, ours = make_model("qwen2"), xhf.patch(make_model("qwen2"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(**batch).loss, ours(**batch).loss
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(b, a)


def test_bfloat16_softcap_is_applied_in_float32():
    """Gemma 2's cap in bfloat16: transformers rounds z / c, tanh and c tanh to bfloat16;
    crossent caps the same bfloat16 logits in float32. Equal to that float32 reference,
    within bfloat16 rounding of transformers' (the documented difference)."""
    ref = make_model("gemma2").to(torch.bfloat16)
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=5)
    batch = make_batch()
    b = ours(**batch).loss
    with torch.no_grad():
        hidden = ref.model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).last_hidden_state
        logits = (hidden @ ref.lm_head.weight.T).float()  # the bfloat16 product, as the head
        cap = ref.config.final_logit_softcapping
        shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
        exact = torch.nn.functional.cross_entropy(
            (cap * torch.tanh(logits / cap)).reshape(-1, VOCAB), shifted.reshape(-1))
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, exact)
    a = ref(**batch).loss
    assert abs(b.item() - a.item()) <= 2**-8 * a.item()


def test_gradient_checkpointing():
    for reentrant in (True, False):
        ref = make_model("qwen2")
        ours = xhf.patch(copy.deepcopy(ref), chunk_size=5)
        for m in (ref, ours):  # renamed in transformers 5.x
            enable = getattr(m, "activation_checkpointing_enable", None)
            if enable is None:
                m.gradient_checkpointing_enable({"use_reentrant": reentrant})
            else:
                enable({"use_reentrant": reentrant})
        assert_same_training_step(ref, ours, make_batch())


def test_copies_pickles_and_checkpoints_keep_the_weights_and_bind_the_patch(tmp_path):
    """deepcopy, pickle and torch.save keep the patch, bound to the copy (a bound method
    of a closure would pickle as ``getattr(model, "forward")``: silently unpatched);
    state_dict, save_pretrained and the config are those of the unpatched model."""
    import io
    import json
    import pickle

    ref = make_model("llama-tied")
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=5)
    batch = make_batch()
    expected = ref(**batch).loss
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(ours), pickle.loads(pickle.dumps(ours)),
              torch.load(buffer, weights_only=False)]
    for clone in copies:
        assert xhf.is_patched(clone) and clone.forward.model is clone
        assert clone.forward.chunk_size == 5
        clone.lm_head.forward = _no_logits
        torch.testing.assert_close(clone(**batch).loss, expected)
        assert clone.lm_head.weight is clone.get_input_embeddings().weight  # still tied
    # the Trainer reads the signature: no self, **kwargs (so num_items_in_batch is passed)
    params = inspect.signature(ours.forward).parameters
    assert "self" not in params and "labels" in params
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    state, plain = ours.state_dict(), ref.state_dict()
    assert list(state) == list(plain)
    assert all(torch.equal(state[k], plain[k]) for k in plain)
    ours.save_pretrained(tmp_path / "patched")
    ref.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "patched" / "config.json").read_text())
    assert config == json.loads((tmp_path / "plain" / "config.json").read_text())
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "patched")
    assert not xhf.is_patched(loaded)
    assert all(torch.equal(loaded.state_dict()[k], plain[k]) for k in plain)


def test_loss_kwargs_match_transformers():
    ref = make_model("llama")
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=7)
    batch = make_batch()
    for kwargs in ({"num_items_in_batch": torch.tensor(50)}, {"num_items_in_batch": 23}):
        for m in (ref, ours):
            m.zero_grad()
        assert_same_training_step(ref, ours, batch, **kwargs)
    # the caller's shift_labels (context-parallel collators), used as given
    shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    shift[1, :5] = -100
    b = {k: v for k, v in batch.items() if k != "labels"}
    a_loss = ref(**b, labels=batch["labels"], shift_labels=shift).loss
    b_loss = ours(**b, labels=batch["labels"], shift_labels=shift).loss
    torch.testing.assert_close(b_loss, a_loss)
    # return_dict=False: the same tuple, logits' place held by None (b[1] is never the cache)
    a = ref(**batch, return_dict=False)
    b = ours(**batch, return_dict=False)
    assert isinstance(b, tuple) and len(b) == len(a) and b[1] is None
    torch.testing.assert_close(b[0], a[0])
    assert [type(x) for x in b[2:]] == [type(x) for x in a[2:]]
    # nothing counted: NaN, as transformers' mean of nothing
    empty = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    assert ref(**empty).loss.isnan() and ours(**empty).loss.isnan()
    # logits_to_keep: the loss on the kept positions' logits, labels given for them
    kept = {**batch, "labels": batch["labels"][:, -5:]}
    torch.testing.assert_close(ours(**kept, logits_to_keep=5).loss,
                               ref(**kept, logits_to_keep=5).loss)


def test_gradient_accumulation_equals_full_batch():
    """Four micro-batches, each normalised by the whole batch's token count, give the
    full batch's gradient; the mean of the micro-batch means does not (so this can fail)."""
    ref = make_model("qwen3")
    ours = xhf.patch(copy.deepcopy(ref), chunk_size=5)
    full = make_batch(batch=8)
    ref(**full).loss.backward()
    num_items = (full["labels"][:, 1:] != -100).sum()
    for mean_of_means in (False, True):
        ours.zero_grad()
        for i in range(4):
            micro = {k: v[2 * i: 2 * i + 2] for k, v in full.items()}
            if mean_of_means:
                (ours(**micro).loss / 4).backward()
            else:
                ours(**micro, num_items_in_batch=num_items).loss.backward()
        named = dict(ours.named_parameters())
        worst = max((named[n].grad - p.grad).abs().max().item()
                    for n, p in ref.named_parameters())
        if mean_of_means:
            assert worst > 1e-3
        else:
            assert worst < 1e-5


def _train(model, data, batch, accumulation, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=2, learning_rate=0.5,
        optim="sgd", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        weight_decay=0.0, seed=0, data_seed=0, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["gemma3"])  # softcapped and tied; one family: ~10 s
def test_trainer_gradient_accumulation_4_equals_full_batch(family, tmp_path):
    pytest.importorskip("accelerate")
    batch = make_batch(seed=3, batch=16)
    data = [{k: v[i] for k, v in batch.items()} for i in range(16)]
    start = make_model(family)
    before = {n: p.detach().clone() for n, p in start.named_parameters()}
    reference = _train(copy.deepcopy(start), data, 8, 1, tmp_path / "ref")
    full = _train(xhf.patch(copy.deepcopy(start), chunk_size=5), data, 8, 1, tmp_path / "f")
    accumulated = _train(xhf.patch(copy.deepcopy(start), chunk_size=5), data, 2, 4,
                         tmp_path / "a")
    moved = max((reference[n] - before[n]).abs().max().item() for n in before)
    assert moved > 1e-2  # the two steps did train
    for name in before:
        torch.testing.assert_close(full[name], reference[name], msg=name)
        torch.testing.assert_close(accumulated[name], full[name], msg=name)


def test_class_patch_instance_patch_twice_and_unpatch():
    cls = transformers.MistralForCausalLM
    original = cls.forward
    ref = make_model("mistral")
    ours = copy.deepcopy(ref)
    batch = make_batch()
    try:
        assert xhf.patch(cls, chunk_size=7) is cls
        assert xhf.patch(cls, chunk_size=5) is cls  # again: options replaced, not nested
        assert cls.forward.chunk_size == 5
        assert cls.forward.__crossent_original_forward__ is original
        # instances made before the patch are patched too, through the class
        assert xhf.is_patched(ours) and "forward" not in vars(ours)
        ours.lm_head.forward = _no_logits
        a = original(ref, **batch)  # the unpatched forward, called directly
        b = ours(**batch)
        assert b.logits is None
        torch.testing.assert_close(b.loss, a.loss)
        a.loss.backward()
        b.loss.backward()
        named = dict(ours.named_parameters())
        for name, p in ref.named_parameters():
            torch.testing.assert_close(named[name].grad, p.grad, msg=name)
        assert "num_items_in_batch" in str(inspect.signature(ours.forward)) or any(
            p.kind is inspect.Parameter.VAR_KEYWORD
            for p in inspect.signature(ours.forward).parameters.values())
        # an instance patch on top wins (in_eval); unpatching it falls back to the class's
        ours.eval()
        xhf.patch(ours, in_eval=True)
        assert ours(**batch).logits is None
        assert xhf.unpatch(ours) is ours and xhf.is_patched(ours)
        with pytest.raises(AssertionError, match="logits were built"):
            ours(**batch)  # eval(): the class patch runs the original forward
        xhf.unpatch(cls)
        assert cls.forward is original and not xhf.is_patched(ours)
        assert xhf.unpatch(cls) is cls and cls.forward is original  # a no-op now
        # an instance patched twice: the second options, one level of wrapping
        model = xhf.patch(xhf.patch(make_model("mistral"), chunk_size=3), in_eval=True)
        assert model.forward.chunk_size is None and model.forward.in_eval
        assert model.forward.__crossent_original_forward__ is original
        assert not xhf.is_patched(xhf.unpatch(xhf.unpatch(model)))
    finally:
        xhf.unpatch(cls)
    assert cls.forward is original


def test_unsupported_and_bad_input_raise():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(UnsupportedError, match="GPT2LMHeadModel is not supported"):
        xhf.patch(gpt2)
    with pytest.raises(UnsupportedError, match="GPT2LMHeadModel"):
        xhf.patch(transformers.GPT2LMHeadModel)

    class Custom(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    with pytest.raises(UnsupportedError, match=r"overrides LlamaForCausalLM\.forward"):
        xhf.patch(Custom)
    for bad in (3, torch.nn.Linear(2, 2)):
        with pytest.raises(InputError, match="model"):
            xhf.patch(bad)
    with pytest.raises(InputError, match="model"):
        xhf.unpatch(3)
    assert not xhf.is_patched(3) and not xhf.is_patched(None)
    model = make_model("llama")
    for bad in (0, 2.5, True):
        with pytest.raises(InputError, match="chunk_size"):
            xhf.patch(model, chunk_size=bad)
    with pytest.raises(InputError, match="in_eval"):
        xhf.patch(model, in_eval="yes")
    assert not xhf.is_patched(model)

    model = make_model("llama")
    model.loss_function = lambda *a, **k: 0.0
    with pytest.raises(UnsupportedError, match="loss_function"):
        xhf.patch(model)
    model = xhf.patch(make_model("llama"))
    model.loss_function = lambda *a, **k: 0.0  # changed after patching: refused at the call
    with pytest.raises(UnsupportedError, match="loss_function"):
        model(**make_batch())
    model = xhf.patch(make_model("llama"))
    model.lm_head.register_forward_hook(lambda *a: None)
    with pytest.raises(UnsupportedError, match="hooks"):
        model(**make_batch())
    model = make_model("llama")
    model.config.vocab_size = VOCAB + 1
    with pytest.raises(UnsupportedError, match="vocab_size"):
        xhf.patch(model)
    with pytest.raises(InputError, match="labels"):
        xhf.causal_lm_loss(torch.zeros(1, 2, 4), torch.zeros(3, 4), None)


def test_peak_memory_is_measured(capsys):
    """Measured, not asserted (timed tests on a shared machine): the figures are printed;
    ``python examples/hf_peak_memory.py`` measures them in fresh processes."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
    try:
        import hf_peak_memory
    finally:
        sys.path.pop(0)
    sizes = {"vocab": 16384, "batch": 1, "seq": 256, "hidden": 32, "device": "cpu"}
    ours = hf_peak_memory.measure("crossent", **sizes)
    ref = hf_peak_memory.measure("transformers", **sizes)
    assert abs(ours["loss"] - ref["loss"]) < 1e-4 * ref["loss"]
    with capsys.disabled():
        print(f"\npeak memory, vocab {sizes['vocab']}, 256 tokens: transformers "
              f"{ref['peak_mib']} MiB, crossent {ours['peak_mib']} MiB")
