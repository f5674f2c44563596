"""Review H72 (session 22): crossent dropped into real training loops, each compared with the
same loop on torch's own loss (``torch.nn.functional.cross_entropy`` / ``F.linear`` +
``cross_entropy`` / ``torch.nn.CrossEntropyLoss`` / ``torch.nn.LinearCrossEntropyLoss``) or a
float64 torch reference. Never crossent against itself.

Covered: CPU ``torch.autocast`` (bfloat16, float16) around model + loss with
``torch.amp.GradScaler``-style scaled losses (2**16, 2**24, inf); ``torch.utils.checkpoint``
(reentrant and not) around a block ending in the loss, under autocast; gradient accumulation
with ``reduction="sum"`` and a global token count; ``torch.func.functional_call`` with
``grad``/``vmap`` per-sample gradients; modules: ``state_dict`` from torch's module, deepcopy,
pickle, ``torch.save``, ``.to(dtype)``, options changed between steps, SGD/AdamW over several
steps; the small-batch fused kernel (``native_dispatch``) in the same loops; the Hugging Face
patch on a tiny Llama trained with gradient accumulation, ``num_items_in_batch``, labels with
-100, gradient checkpointing and autocast.

The tests directory's conftest routes ``backend="auto"`` to the fused kernels at every size
(``NATIVE_MAX_LOGITS = 0``) unless a test is marked ``native_dispatch``.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

import crossent
import crossent.torch as xt

FLOAT16_AUTOCAST = True
try:
    with torch.autocast("cpu", dtype=torch.float16):
        pass
except RuntimeError:  # pragma: no cover - older torch
    FLOAT16_AUTOCAST = False


def _same_pattern(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert _same_pattern(a, b)
    torch.testing.assert_close(a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0), rtol=rtol,
                               atol=atol)


# ---------------------------------------------------------------------------------------
# autocast + scaled losses (GradScaler style) + checkpointing, logits and linear head
# ---------------------------------------------------------------------------------------


def _mlp_step(loss_fn, scale, label_smoothing):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 11))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(24, 16)
    y = torch.randint(0, 11, (24,))
    y[::5] = -100
    seen = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            loss = loss_fn(logits, y, label_smoothing=label_smoothing)
        seen.append((logits.dtype, loss.dtype, loss.detach().clone()))
        opt.zero_grad()
        (loss * scale).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
    return seen, grads


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("scale", [1.0, 2.0 ** 16, 2.0 ** 24, float("inf")])
def test_bfloat16_autocast_training_with_scaled_losses_is_torchs(scale, label_smoothing):
    ref_seen, ref_grads = _mlp_step(F.cross_entropy, scale, label_smoothing)
    got_seen, got_grads = _mlp_step(xt.cross_entropy, scale, label_smoothing)
    for (rz, rl, rv), (gz, gl, gv) in zip(ref_seen, got_seen, strict=True):
        assert (rz, rl) == (gz, gl) == (torch.bfloat16, torch.float32)
        _close(gv, rv, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        _close(g, r, rtol=1e-5, atol=1e-6 * max(1.0, r.nan_to_num(0, 0, 0).abs().max().item()))


_BODY_X = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("scale", [1.0, 2.0 ** 16, float("inf")])
@pytest.mark.parametrize("ckpt", [None, "reentrant", "non_reentrant"])
@pytest.mark.parametrize("autocast", [False, True])
def test_checkpointed_linear_head_under_autocast_and_scaling_is_torchs(autocast, ckpt, scale,
                                                                       label_smoothing):
    torch.manual_seed(0)
    body, head = nn.Linear(6, 16), nn.Linear(16, 13)
    y = torch.randint(0, 13, (10,))
    y[:3] = -100
    cw = torch.rand(13) + 0.5

    def step(lib):
        params = [*body.parameters(), *head.parameters()]
        for p in params:
            p.grad = None
        x = _BODY_X.clone().requires_grad_()

        def block(x):
            h = torch.tanh(body(x))
            if lib == "torch":
                return F.cross_entropy(F.linear(h, head.weight, head.bias).float(), y,
                                       weight=cw, label_smoothing=label_smoothing)
            return xt.linear_cross_entropy(h, head.weight, y, head.bias, weight=cw,
                                           label_smoothing=label_smoothing)

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = (block(x) if ckpt is None
                    else checkpoint(block, x, use_reentrant=ckpt == "reentrant"))
        (loss * scale).backward()
        return loss.detach(), [x.grad, *(p.grad for p in params)]

    ref_loss, ref = step("torch")
    got_loss, got = step("crossent")
    _close(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
    tol = 2e-2 if autocast else 1e-5
    for g, r in zip(got, ref, strict=True):
        _close(g, r, rtol=tol, atol=tol * max(1e-30, r.nan_to_num(0, 0, 0).abs().max().item()))


def test_num_items_folds_the_count_like_torch_under_bfloat16_autocast():
    """Under autocast the count given as ``num_items`` gives torch's bf16 gradients bit for
    bit (one rounding); a ``sum / n`` outside the loss is the documented second rounding."""
    torch.manual_seed(0)
    x = torch.randn(18, 32, requires_grad=True)
    w = (torch.randn(97, 32) * 0.2).requires_grad_()
    y = torch.randint(0, 97, (18,))
    y[:4] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(x, w).float(), y, reduction="sum") / 23
        got = xt.linear_cross_entropy(x, w, y, reduction="sum", num_items=23)
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    for g, r in zip(torch.autograd.grad(got, [x, w]), torch.autograd.grad(ref, [x, w]),
                    strict=True):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)


def _amp_float16_grads(loss_fn, *, amp: bool, dtype=torch.float32):
    """One AMP step (``torch.autocast`` float16 + ``torch.amp.GradScaler``, unscaled before
    the optimizer would step) of a model whose logits are ``nn.Linear``'s."""
    torch.manual_seed(0)
    n, c = 2048, 8192
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, c)).to(dtype)
    x = torch.randn(n, 16).to(dtype)
    y = torch.randint(0, c, (n,))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=amp)
    with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    return [p.grad.double() for p in model.parameters()]


@pytest.mark.skipif(not FLOAT16_AUTOCAST, reason="no float16 CPU autocast")
def test_float16_amp_with_grad_scaler_keeps_the_small_softmax_gradients():
    ref = _amp_float16_grads(F.cross_entropy, amp=False, dtype=torch.float64)
    torch_amp = _amp_float16_grads(F.cross_entropy, amp=True)
    got = _amp_float16_grads(xt.cross_entropy, amp=True)
    for g, t, r in zip(got, torch_amp, ref, strict=True):
        torch_err = ((t - r).norm() / r.norm()).item()
        assert torch_err < 2e-3  # torch's AMP step: float16 rounding only
        assert ((g - r).norm() / r.norm()).item() < 4 * torch_err


def _scaled_float16_logits_grads(kw):
    """d(65536 * loss)/d(float16 logits): float64 reference, torch on the float32 upcast (what
    autocast runs), crossent on the float16 logits with a float32 loss."""
    g = torch.Generator().manual_seed(0)
    n, c = 2048, 8192
    z0 = torch.randn(n, c, generator=g).half()
    y = torch.randint(0, c, (n,), generator=g)
    ref_kw = {k: v for k, v in kw.items() if k not in ("num_items", "backend")}

    def torch_loss(z):
        loss = F.cross_entropy(z, y, **ref_kw)
        return (loss.mean() if kw.get("reduction") == "none" else loss) / kw.get("num_items", 1)

    out = []
    for make, loss_fn in ((lambda: z0.double(), torch_loss),
                          (lambda: z0.clone(), lambda z: torch_loss(z.float())),
                          (lambda: z0.clone(), lambda z: xt.cross_entropy(
                              z, y, loss_dtype=torch.float32, **kw).mean())):
        z = make().requires_grad_()
        (loss_fn(z) * 2.0 ** 16).backward()
        out.append(z.grad.double())
    return out


@pytest.mark.parametrize("kw", [{"reduction": "none"}, {"backend": "native"}],
                         ids=["none", "native"])
def test_scaled_float16_logits_gradient_keeps_torchs_accuracy_without_the_mean(kw):
    ref, torch_grad, got = _scaled_float16_logits_grads(kw)
    torch_err = ((torch_grad - ref).norm() / ref.norm()).item()
    assert ((got - ref).norm() / ref.norm()).item() < 2 * torch_err
    assert int((got == 0).sum()) == int((torch_grad == 0).sum())


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1},
                                {"reduction": "sum", "num_items": 2048}],
                         ids=["mean", "mean_smoothed", "num_items"])
def test_scaled_float16_logits_gradient_keeps_torchs_accuracy_with_the_mean(kw):
    ref, torch_grad, got = _scaled_float16_logits_grads(kw)
    torch_err = ((torch_grad - ref).norm() / ref.norm()).item()
    assert ((got - ref).norm() / ref.norm()).item() < 2 * torch_err


# ---------------------------------------------------------------------------------------
# in-place changes between forward and backward (torch's version counter)
# ---------------------------------------------------------------------------------------


def _linear_step_then_mutate(lib, what):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g).requires_grad_()
    w = torch.randn(5, 6, generator=g).requires_grad_()
    cw = torch.rand(5, generator=g) + 0.5
    y = torch.randint(0, 5, (8,), generator=g)
    if lib == "torch":
        loss = F.linear_cross_entropy(x, w, y, weight=cw)
    else:
        loss = xt.linear_cross_entropy(x, w, y, weight=cw)
    with torch.no_grad():
        {"input": x, "linear_weight": w, "weight": cw}[what].mul_(2)
    loss.backward()


@pytest.mark.parametrize("what", ["input", "linear_weight", "weight"])
def test_torch_refuses_a_saved_input_changed_in_place_before_backward(what):
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _linear_step_then_mutate("torch", what)


@pytest.mark.parametrize("what", ["input", "linear_weight", "weight"])
def test_crossent_refuses_a_saved_input_changed_in_place_before_backward(what):
    with pytest.raises(RuntimeError):
        _linear_step_then_mutate("crossent", what)


def _optimizer_step_between_two_backwards(lib):
    """Two losses through one model, ``optimizer.step()`` misplaced between their backwards:
    the head's weight (saved by the second loss) is changed in place. The body's first
    layer takes data, so only the head's saved weight can tell."""
    torch.manual_seed(0)
    body, head = nn.Linear(6, 8), nn.Linear(8, 5)
    opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.1)
    x, y = torch.randn(4, 6), torch.randint(0, 5, (4,))
    if lib == "torch":
        l1, l2 = (F.cross_entropy(head(body(x)), y) for _ in range(2))
    else:
        l1, l2 = (xt.linear_cross_entropy(body(x), head.weight, y, head.bias) for _ in range(2))
    l1.backward()
    opt.step()
    l2.backward()


def test_torch_refuses_backward_after_an_optimizer_step_changed_the_head():
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _optimizer_step_between_two_backwards("torch")


def test_crossent_refuses_backward_after_an_optimizer_step_changed_the_head():
    with pytest.raises(RuntimeError):
        _optimizer_step_between_two_backwards("crossent")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_class_weight_buffer_changed_in_place_before_backward_raises_as_torch(label_smoothing):
    crit = xt.CrossEntropyLoss(weight=torch.rand(5) + 0.5, label_smoothing=label_smoothing)
    z = torch.randn(8, 5, requires_grad=True)
    loss = crit(z * 1.0, torch.randint(0, 5, (8,)))
    with torch.no_grad():
        crit.weight.copy_(torch.rand(5) + 0.5)  # e.g. class re-weighting from batch stats
    with pytest.raises(RuntimeError):
        loss.backward()


def test_torch_module_refuses_the_same_class_weight_change():
    for ls in (0.0, 0.1):
        crit = nn.CrossEntropyLoss(weight=torch.rand(5) + 0.5, label_smoothing=ls)
        z = torch.randn(8, 5, requires_grad=True)
        loss = crit(z * 1.0, torch.randint(0, 5, (8,)))
        with torch.no_grad():
            crit.weight.copy_(torch.rand(5) + 0.5)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


# ---------------------------------------------------------------------------------------
# gradient accumulation with a global token count
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["num_items_int", "num_items_tensor", "sum_then_divide"])
@pytest.mark.parametrize("kind", ["logits", "linear", "linear_shift"])
def test_accumulated_micro_batches_with_a_global_count_are_the_full_batch(kind, how):
    g = torch.Generator().manual_seed(0)
    d, v = 8, 13
    head = torch.randn(v, d, dtype=torch.float64, generator=g).requires_grad_()
    x = torch.randn(4, 7, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, v, (4, 7), generator=g)
    y[0, :5] = -100
    y[2, 1] = -100
    shift = kind == "linear_shift"
    # full batch, torch
    if shift:
        counted = int((y[:, 1:] != -100).sum())
        full = F.cross_entropy(F.linear(x[:, :-1], head).reshape(-1, v), y[:, 1:].reshape(-1))
    else:
        counted = int((y != -100).sum())
        full = F.cross_entropy(F.linear(x, head).reshape(-1, v), y.reshape(-1))
    ref, = torch.autograd.grad(full, head)
    total = torch.zeros(())
    for mb in range(4):  # uneven micro-batches: one sequence each
        xs, ys = x[mb:mb + 1], y[mb:mb + 1]
        count = torch.tensor(counted) if how == "num_items_tensor" else counted
        extra = {} if how == "sum_then_divide" else {"num_items": count}
        if kind == "logits":
            loss = xt.cross_entropy(F.linear(xs, head).reshape(-1, v), ys.reshape(-1),
                                    reduction="sum", **extra)
        else:
            loss = xt.linear_cross_entropy(xs if shift else xs.reshape(-1, d), head,
                                           ys if shift else ys.reshape(-1),
                                           reduction="sum", shift=shift, **extra)
        if how == "sum_then_divide":
            loss = loss / counted
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.grad, ref, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------
# torch.func: functional_call + grad / vmap per-sample gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.2}, {"weight": "w"},
                                {"weight": "w", "label_smoothing": 0.1, "reduction": "sum"}],
                         ids=["plain", "smooth", "weighted", "weighted_smooth_sum"])
def test_per_sample_gradients_of_a_model_with_functional_call_are_torchs(kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5)).double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    y[2] = -100  # that sample's "mean" is 0/0: NaN loss, torch's gradient pattern
    kw = {k: (torch.rand(5, dtype=torch.float64) + 0.5 if v == "w" else v)
          for k, v in kw.items()}

    def per_sample(loss_fn):
        def loss(p, xi, yi):
            return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0), **kw)
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    ref, got = per_sample(F.cross_entropy), per_sample(xt.cross_entropy)
    for k in ref:
        _close(got[k], ref[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1}, {"reduction": "sum"},
                                {"weight": "w", "label_smoothing": 0.2}],
                         ids=["plain", "smooth", "sum", "weighted_smooth"])
def test_per_sample_gradients_of_the_linear_module_are_torchs_module(kw):
    torch.manual_seed(0)
    kw = {k: (torch.rand(9, dtype=torch.float64) + 0.5 if v == "w" else v)
          for k, v in kw.items()}
    ref_mod = nn.LinearCrossEntropyLoss(6, 9, bias=True, **kw).double()
    our_mod = xt.LinearCrossEntropyLoss(6, 9, bias=True, **kw).double()
    our_mod.load_state_dict(ref_mod.state_dict())
    params = {k: p.detach() for k, p in ref_mod.named_parameters()}
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    y = torch.randint(0, 9, (5, 4))
    y[1, 2] = -100

    def per_sample(mod):
        return vmap(grad(lambda p, xi, yi: functional_call(mod, p, (xi, yi))),
                    in_dims=(None, 0, 0))(params, x, y)

    ref, got = per_sample(ref_mod), per_sample(our_mod)
    for k in ref:
        _close(got[k], ref[k], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------
# modules: state_dict, copies, dtype conversion, options changed during training
# ---------------------------------------------------------------------------------------


def test_linear_module_loads_torchs_state_dict_and_survives_copies():
    torch.manual_seed(0)
    ref = nn.LinearCrossEntropyLoss(8, 5, bias=True, weight=torch.rand(5) + 0.5,
                                    label_smoothing=0.05)
    ours = xt.LinearCrossEntropyLoss(8, 5, bias=True, weight=torch.rand(5) + 0.5,
                                     label_smoothing=0.05)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x, y = torch.randn(6, 8), torch.randint(0, 5, (6,))
    y[1] = -100
    want = ref(x, y)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    for mod in (ours, copy.deepcopy(ours), pickle.loads(pickle.dumps(ours)),
                torch.load(buf, weights_only=False)):
        torch.testing.assert_close(mod(x, y), want, rtol=1e-6, atol=1e-7)
        assert mod.train()(x, y).item() == mod.eval()(x, y).item()


@pytest.mark.parametrize("convert", ["double", "float"])
def test_modules_converted_with_their_class_weight_buffer_are_torchs(convert):
    torch.manual_seed(0)
    w = torch.rand(7) + 0.5
    ref = getattr(nn.CrossEntropyLoss(weight=w.clone(), label_smoothing=0.1), convert)()
    ours = getattr(xt.CrossEntropyLoss(weight=w.clone(), label_smoothing=0.1), convert)()
    assert ours.weight.dtype == ref.weight.dtype
    z = torch.randn(9, 7, dtype=ref.weight.dtype, requires_grad=True)
    y = torch.randint(0, 7, (9,))
    y[0] = -100
    lr, lo = ref(z, y), ours(z, y)
    tol = 1e-12 if convert == "double" else 1e-6
    torch.testing.assert_close(lo, lr, rtol=tol, atol=tol)
    torch.testing.assert_close(torch.autograd.grad(lo, z)[0], torch.autograd.grad(lr, z)[0],
                               rtol=tol, atol=tol)


def _train_loop(loss_mod, dtype, opt_name, linear):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 16), nn.Tanh()).to(dtype)
    head = None if linear else nn.Linear(16, 9).to(dtype)
    loss_mod = loss_mod.to(dtype)
    params = [*body.parameters(), *([] if linear else head.parameters()),
              *loss_mod.parameters()]
    opt = (torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01) if opt_name == "adamw"
           else torch.optim.SGD(params, lr=0.5, momentum=0.9))
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(5):
        x = torch.randn(12, 6, generator=g, dtype=dtype)
        y = torch.randint(0, 9, (12,), generator=g)
        y[(step + 3) % 12] = 4
        if step == 2:  # options changed mid-training, as a schedule would
            loss_mod.ignore_index = 4
            loss_mod.label_smoothing = 0.15
        if step == 3:
            loss_mod.weight = torch.rand(9, generator=g, dtype=dtype) + 0.5
        if step == 4:
            loss_mod.reduction = "sum"
        y[step % 12] = -100 if loss_mod.ignore_index is None else loss_mod.ignore_index
        opt.zero_grad()
        h = body(x)
        loss = loss_mod(h, y) if linear else loss_mod(head(h), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach() for p in params]


def _linear_pair(options):
    torch.manual_seed(5)
    ref = nn.LinearCrossEntropyLoss(16, 9, bias=True, options=options)
    ours = xt.LinearCrossEntropyLoss(16, 9, bias=True, options=options)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["logits", "linear", "linear_options", "linear_chunked"])
def test_optimizer_steps_with_options_changed_between_steps_match_torchs_loop(kind, dtype,
                                                                             opt_name):
    if kind == "logits":
        ref_mod, our_mod = nn.CrossEntropyLoss(), xt.CrossEntropyLoss()
    else:
        options = {"linear": None, "linear_options": nn.LinearCrossEntropyOptions(),
                   "linear_chunked": nn.LinearCrossEntropyOptions(
                       batch_chunk_size=5, allow_retain_graph=True)}[kind]
        ref_mod, our_mod = _linear_pair(options)
    linear = kind != "logits"
    ref_losses, ref_params = _train_loop(ref_mod, dtype, opt_name, linear)
    our_losses, our_params = _train_loop(our_mod, dtype, opt_name, linear)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(our_losses, ref_losses, rtol=tol, atol=tol)
    for o, r in zip(our_params, ref_params, strict=True):
        torch.testing.assert_close(o, r, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------
# the small-batch fused kernel (torch's dispatch kept) in the same loops
# ---------------------------------------------------------------------------------------


@pytest.mark.native_dispatch
@pytest.mark.parametrize("scale", [1.0, 65536.0, float("inf"), float("nan"), 0.0, -1.0])
@pytest.mark.parametrize("ckpt", [None, "reentrant", "non_reentrant"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_small_batch_kernel_with_checkpointing_and_scaled_losses_is_torchs(reduction, ckpt,
                                                                           scale):
    from crossent.torch import _small

    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(250, 1000, generator=g)  # 250 000 logits: the small-batch kernel
    y = torch.randint(0, 1000, (250,), generator=g)
    y[::7] = -100
    calls = []
    real = _small._SmallCrossEntropy.apply

    def step(loss_fn):
        z = z0.clone().requires_grad_()
        def f(z):
            return loss_fn(z, y, reduction=reduction)
        loss = f(z) if ckpt is None else checkpoint(f, z, use_reentrant=ckpt == "reentrant")
        (loss * scale).sum().backward()
        return loss.detach(), z.grad

    ref = step(F.cross_entropy)
    _small._SmallCrossEntropy.apply = lambda *a: calls.append(1) or real(*a)
    try:
        got = step(xt.cross_entropy)
    finally:
        _small._SmallCrossEntropy.apply = real
    assert calls  # the small-batch kernel served it
    for o, r in zip(got, ref, strict=True):
        _close(o, r, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Hugging Face: a tiny Llama trained patched and unpatched
# ---------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    from crossent.integrations.transformers import patch

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).train(), patch


def _hf_train(model, ids, labels, *, autocast, checkpointing, steps=3):
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        count = (labels[:, 1:] != -100).sum()  # the Trainer's num_items_in_batch
        total = torch.zeros(())
        for mb in range(2):  # gradient accumulation over two micro-batches
            rows = slice(2 * mb, 2 * mb + 2)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=count)
            assert out.loss.dtype == torch.float32
            out.loss.backward()
            total = total + out.loss.detach()
        opt.step()
        losses.append(total)
    return torch.stack(losses), {k: p.detach() for k, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_hf_llama_gradient_accumulation_training_matches_unpatched(checkpointing):
    base, patch = _tiny_llama()
    ids = torch.randint(0, 97, (4, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 5:] = -100
    ref = _hf_train(copy.deepcopy(base), ids, labels, autocast=False,
                    checkpointing=checkpointing)
    got = _hf_train(patch(copy.deepcopy(base)), ids, labels, autocast=False,
                    checkpointing=checkpointing)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for k in ref[1]:
        torch.testing.assert_close(got[1][k], ref[1][k], rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore")
def test_hf_llama_bfloat16_autocast_step_without_a_count_is_unpatched_bit_for_bit():
    base, patch = _tiny_llama()
    ids = torch.randint(0, 97, (4, 10))
    labels = ids.clone()
    labels[:, :3] = -100

    def step(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        return out.loss.detach(), {k: p.grad for k, p in model.named_parameters()}

    ref, got = step(copy.deepcopy(base)), step(patch(copy.deepcopy(base)))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    for k in ref[1]:
        torch.testing.assert_close(got[1][k], ref[1][k], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore")
def test_hf_patch_refuses_gpt2_naming_the_class():
    from crossent.integrations.transformers import patch

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=97, bos_token_id=0, eos_token_id=0))
    with pytest.raises(crossent.UnsupportedError, match="GPT2LMHeadModel"):
        patch(model)
