"""Review H107 (session 29): crossent.torch in mixed-precision training loops under
``torch.compile`` on CPU, against the identical loop with torch's own loss.

A tiny LM (``nn.Embedding`` + two ``nn.Linear``/GELU layers + a bias-free LM head, vocabulary
1024, hidden 32, batches of 8 x 16 tokens, some ignored) trains a few SGD steps with

* float16 autocast + ``torch.amp.GradScaler("cpu")`` (init scales 2**16 and 2**24, growth
  every 2 steps): the scale trajectory (and so the skipped steps) must be torch's;
* float16 parameters (no autocast; a static loss scale of 1024, since GradScaler refuses to
  unscale float16 gradients);
* bfloat16 autocast, no scaler;
* gradient accumulation over micro-batches with ``num_items`` a 0-d tensor.

The loss is ``xt.cross_entropy`` / ``xt.CrossEntropyLoss`` on the logits or
``xt.linear_cross_entropy`` on the hidden states and the head's weight, the model compiled with
``backend="eager"`` and ``"aot_eager"`` (``fullgraph=True``). ``backend="rowblock"`` makes
crossent's own kernel serve these small inputs (under ``"auto"`` they go to torch's kernel,
whose bits are torch's: a comparison that could not fail).

References: the same loop with ``F.cross_entropy(F.linear(h, W), y)`` (never crossent's
output) for the scales, losses and weights; eager crossent for the documented bit-for-bit
equality under compile (README "torch.compile", docs/guarantees.md "Under torch.compile",
commit e2104a9: float16 gradients recomputed in backward with the real ``grad_output``).

Tolerances against torch: the loss is float32 in the autocast loops; crossent's and torch's
reductions differ in float32 rounding (a few ulps of a loss near 7, ulp 4.8e-7) and the
weights then drift by float16/bfloat16 rounding of single gradient entries (float16 ulp 2**-11
relative, bfloat16 2**-8). Measured here: float16 autocast per-step loss differences <= 1.9e-6
and weights <= 5.7e-6 absolute (relative norm <= 2.1e-5, the linear head's float32-summed dW);
bfloat16 <= 1.3e-5 / 1.5e-5; float16 parameters: the float16 loss differs by at most one
float16 ulp (3.9e-3 at 7; crossent's float32 loss rounded once is never farther from float64
than torch's) and weights by <= 2.4e-4 (relative norm 1.3e-4).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import crossent.torch as xt

pytestmark = pytest.mark.timeout(120)

V, D, B, T = 1024, 32, 8, 16


class _Net(nn.Module):
    def __init__(self, loss: str, backend: str = "rowblock", logit_hook=None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.l1, self.l2 = nn.Linear(D, D), nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.kind, self.backend, self.logit_hook = loss, backend, logit_hook
        self.xmod = xt.CrossEntropyLoss(backend=backend)

    def forward(self, tok, y, num_items=None):
        h = F.gelu(self.l2(F.gelu(self.l1(self.emb(tok))))).reshape(-1, D)
        y = y.reshape(-1)
        if self.kind == "torch":
            z = F.linear(h, self.head.weight)
            if self.logit_hook is not None:
                z.register_hook(self.logit_hook)
            if num_items is None:
                return F.cross_entropy(z, y)
            return F.cross_entropy(z, y, reduction="sum") / num_items
        if self.kind == "xce":
            return xt.cross_entropy(self.head(h), y, num_items=num_items, backend=self.backend)
        if self.kind == "xmod":
            return self.xmod(self.head(h), y)
        return xt.linear_cross_entropy(h, self.head.weight, y, num_items=num_items,
                                       backend=self.backend)


def _batches(steps: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tok = torch.randint(0, V, (B, T), generator=g)
        y = torch.randint(0, V, (B, T), generator=g)
        y[torch.rand(B, T, generator=g) < 0.15] = -100
        yield tok, y


def _compiled(net, compile_backend, counter=None):
    torch._dynamo.reset()
    if compile_backend is None:
        return net
    base = torch._dynamo.lookup_backend(compile_backend)

    def counting(gm, example_inputs):
        if counter is not None:
            counter.append(1)
        return base(gm, example_inputs)

    return torch.compile(net, backend=counting, fullgraph=True)


def _loop(loss, compile_backend, prec, *, steps=5, init_scale=2.0**16, logit_hook=None):
    """Returns per-step losses (float32), scales after each step, final weights."""
    net = _Net(loss, logit_hook=logit_hook)
    if prec == "fp16p":
        net = net.half()
    f = _compiled(net, compile_backend)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    scaler = (torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
              if prec == "fp16amp" else None)
    losses, scales = [], []
    for tok, y in _batches(steps):
        opt.zero_grad(set_to_none=True)
        if prec == "fp16amp":
            with torch.autocast("cpu", dtype=torch.float16):
                loss_ = f(tok, y)
            scaler.scale(loss_).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        elif prec == "bf16amp":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss_ = f(tok, y)
            loss_.backward()
            opt.step()
        else:  # float16 parameters, static loss scale (a power of two)
            loss_ = f(tok, y)
            assert loss_.dtype == torch.float16
            (loss_ * 1024).backward()
            for p in net.parameters():
                p.grad.div_(1024)
            opt.step()
        losses.append(loss_.detach().float().clone())
    return torch.stack(losses), scales, [p.detach().clone() for p in net.parameters()]


def _bitwise(a, b) -> bool:
    return (torch.equal(a[0], b[0]) and a[1] == b[1]
            and all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True)))


def _rel(a, b) -> float:
    return max(((x.double() - y.double()).norm() / y.double().norm()).item()
               for x, y in zip(a[2], b[2], strict=True))


_TOL = {  # precision: (per-step loss atol, weights relative norm)
    "fp16amp": (2e-5, 1e-4),
    "bf16amp": (1e-4, 1e-3),
    "fp16p": (None, 1e-3),
}


@pytest.mark.parametrize(("prec", "init_scale", "loss"), [
    ("fp16amp", 2.0**16, "xce"),
    ("fp16amp", 2.0**16, "xmod"),
    ("fp16amp", 2.0**16, "xlce"),
    ("fp16amp", 2.0**24, "xce"),
    ("bf16amp", None, "xce"),
    ("bf16amp", None, "xlce"),
    ("fp16p", None, "xce"),
    ("fp16p", None, "xlce"),
])
def test_compiled_amp_loop_matches_torch_and_eager_crossent(prec, init_scale, loss):
    """Compiled crossent (``"eager"`` and ``"aot_eager"``) is eager crossent's loop bit for bit
    (losses, scales, weights); against torch's loss: the GradScaler's scales (hence skipped
    steps) equal, losses and weights within float16/bfloat16 rounding."""
    kw = {"init_scale": init_scale} if init_scale else {}
    ref = _loop("torch", None, prec, **kw)
    eager = _loop(loss, None, prec, **kw)
    backends = ["eager", "aot_eager"] if init_scale != 2.0**24 else ["aot_eager"]
    for cb in backends:
        assert _bitwise(_loop(loss, cb, prec, **kw), eager), cb
    if init_scale == 2.0**24:  # the setup overflows at first: steps skipped, scale backs off
        assert ref[1][0] < init_scale
    assert eager[1] == ref[1]
    loss_tol, w_tol = _TOL[prec]
    if loss_tol is None:  # a float16 loss: within one float16 ulp of torch's at each step
        ulp = torch.finfo(torch.float16).eps * 2.0 ** torch.floor(torch.log2(ref[0]))
        assert bool(((eager[0] - ref[0]).abs() <= ulp).all()), (eager[0], ref[0])
    else:
        torch.testing.assert_close(eager[0], ref[0], rtol=0, atol=loss_tol)
    assert _rel(eager, ref) <= w_tol


def test_linear_head_2_24_compiled_is_eager_bitwise_scales_part_from_torch_documented():
    """xt.linear_cross_entropy under float16 autocast at 2**24: compiled is eager bit for bit;
    the scales part from torch's (documented difference H99-2, docs/guarantees.md: torch's
    float16 logits gradient overflows and its step is skipped, crossent's head gradients are
    formed from the float32 logits gradient, finite, and the step is taken)."""
    ref = _loop("torch", None, "fp16amp", init_scale=2.0**24)
    eager = _loop("xlce", None, "fp16amp", init_scale=2.0**24)
    assert _bitwise(_loop("xlce", "aot_eager", "fp16amp", init_scale=2.0**24), eager)
    assert eager[1][0] == ref[1][0] and eager[1] != ref[1]  # step 2: torch skips, crossent not


def test_float16_loss_never_farther_from_float64_than_torch():
    """The fp16-parameter loop's one-ulp loss differences: crossent's float16 loss (float32,
    rounded once) is at least as close to the float64 loss of the same logits as torch's."""
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        z = (torch.randn(112, V, generator=g) * 2).half()
        y = torch.randint(0, V, (112,), generator=g)
        exact = F.cross_entropy(z.double(), y)
        err_t = (F.cross_entropy(z, y).double() - exact).abs()
        err_x = (xt.cross_entropy(z, y, backend="rowblock").double() - exact).abs()
        assert err_x <= err_t


# ------------------------------------------- first step: gradients at a GradScaler's scale ----

def _first_step_grads(loss, compile_backend, logit_hook=None, init_scale=2.0**16):
    net = _Net(loss, logit_hook=logit_hook)
    f = _compiled(net, compile_backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    tok, y = next(_batches(1))
    with torch.autocast("cpu", dtype=torch.float16):
        loss_ = f(tok, y)
    scaler.scale(loss_).backward()
    scaler.unscale_(opt)
    return [p.grad.clone() for p in net.parameters()]


def _grad_err(a, b) -> float:
    return max(((x.double() - y.double()).norm() / y.double().norm()).item()
               for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compiled_float16_grads_at_scaler_scale_are_not_rounded_at_unit_scale(compile_backend):
    """e2104a9's loop-level effect: under compile, float16 autocast at 2**16, the unscaled
    first-step gradients of every parameter are eager crossent's bitwise and as close to torch's
    as eager's. The pre-e2104a9 behaviour (logits gradient rounded to float16 at grad_output 1,
    then scaled), emulated on torch's own loop by a hook, is measurably farther from torch: the
    tolerance below would catch it."""
    scale = 2.0**16
    ref = _first_step_grads("torch", None)
    eager = _first_step_grads("xce", None)
    comp = _first_step_grads("xce", compile_backend)
    assert all(torch.equal(a, b) for a, b in zip(comp, eager, strict=True))
    old = _first_step_grads(
        "torch", None,
        logit_hook=lambda g: ((g.float() / scale).half().float() * scale).half())
    err_now, err_old = _grad_err(comp, ref), _grad_err(old, ref)
    assert err_now <= 3e-5 < err_old, (err_now, err_old)


# --------------------------------------------- gradient accumulation, num_items a 0-d tensor ----

def _accum_loop(loss, compile_backend, steps=3, micro=4):
    counter: list[int] = []
    net = _Net(loss)
    f = _compiled(net, compile_backend, counter)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    totals, scales, counts = [], [], []
    for tok, y in _batches(steps):
        n = (y != -100).sum()  # a 0-d tensor, different every step
        counts.append(int(n))
        total = torch.zeros(())
        for tk, yy in zip(tok.chunk(micro), y.chunk(micro), strict=True):
            with torch.autocast("cpu", dtype=torch.float16):
                part = f(tk, yy, n)
            scaler.scale(part).backward()
            total += part.detach()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        totals.append(total)
        scales.append(scaler.get_scale())
    return (torch.stack(totals), scales, [p.detach().clone() for p in net.parameters()],
            len(counter), counts)


@pytest.mark.parametrize("loss", ["xce", "xlce"])
def test_grad_accumulation_num_items_tensor_under_compile(loss):
    """Four micro-batches per step, ``num_items`` the full batch's count as a 0-d tensor:
    one compile for every step (no recompile per count), eager crossent's bits, torch's
    ``sum / n`` loop to rounding (summed micro-batch losses, scales, weights)."""
    ref = _accum_loop("torch", None)
    eager = _accum_loop(loss, None)
    comp = _accum_loop(loss, "aot_eager")
    assert len(set(ref[4])) > 1  # the count changes from step to step
    assert comp[3] == 1
    assert _bitwise(comp[:3], eager[:3])
    assert eager[1] == ref[1]
    torch.testing.assert_close(eager[0], ref[0], rtol=0, atol=2e-5)
    assert _rel(eager, ref) <= 1e-4


# ---------------------------------------------------------------- Hugging Face, patched ----

def test_patched_llama_compiled_float16_autocast_scaler_loop():
    """A tiny Llama from a config (no download), patched, compiled (``aot_eager``), float16
    autocast + GradScaler at 2**16: eager patched crossent's losses and weights bit for bit;
    against the unpatched model: the scales equal, losses and weights within float16
    rounding."""
    transformers = pytest.importorskip("transformers")
    from crossent.integrations.transformers import patch

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)

    def run(patched, compile_backend, steps=4):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).train()
        if patched:
            patch(model)
        f = _compiled(model, compile_backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
        g = torch.Generator().manual_seed(1)
        losses, scales = [], []
        for _ in range(steps):
            ids = torch.randint(0, 512, (B, T), generator=g)
            labels = ids.clone()
            labels[:, :3] = -100
            with torch.autocast("cpu", dtype=torch.float16):
                out = f(input_ids=ids, labels=labels)
            scaler.scale(out.loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.detach().float().clone())
            scales.append(scaler.get_scale())
        return torch.stack(losses), scales, [p.detach().clone() for p in model.parameters()]

    ref = run(False, None)
    eager = run(True, None)
    comp = run(True, "aot_eager")
    assert _bitwise(comp, eager)
    assert eager[1] == ref[1]
    torch.testing.assert_close(eager[0], ref[0], rtol=0, atol=2e-5)
    assert _rel(eager, ref) <= 1e-3  # measured 2.1e-4 after 4 steps (step 1's grads equal)
