"""What the in-place and gradient-adoption tests share (tests/torch, tests/triton and the
distributed tests import it as ``grad_probes``): torch's gradient in float64, a dtype's
closeness, and the probe for a hidden copy (the data pointers of the gradients a fused
Function's backward returns, compared afterwards with the leaves' ``.grad``); and the
float64 references of the contender-semantics and review tests (torch's loss with z-loss,
softcap and ``num_items`` written out, the unfused head, NaN-exact comparison)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def torch_grad(z, y, reduction="mean", grad_output=None, **kw):
    """``d F.cross_entropy(z, y) / dz`` in float64, ``grad_output`` for ``"none"``."""
    ref = z.detach().double().requires_grad_()
    loss = F.cross_entropy(ref, y, reduction=reduction, **kw)
    loss.backward(None if grad_output is None else grad_output.double())
    return ref.grad


def assert_grad_close(got, want, dtype=torch.float32, atol=1e-7):
    """``got`` against a float64 ``want``: bf16's rounding for bf16, else 1e-5 relative."""
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5,
                                                                         atol=atol)
    torch.testing.assert_close(got.double(), want, **tol)


def fused_node(loss):
    """The autograd Function's node behind ``loss`` (past views and casts)."""
    node = loss.grad_fn
    while not isinstance(node, torch.autograd.function.BackwardCFunction):
        node = node.next_functions[0][0]
    return node


def returned_grad_ptrs(loss, node=None):
    """Data pointers of the gradients ``node``'s (default: :func:`fused_node`'s) backward
    returns, filled during backward. Pointers only: a kept tensor would itself make
    autograd copy it."""
    seen: list[list[int | None]] = []
    (fused_node(loss) if node is None else node).register_hook(
        lambda gi, go: seen.append([None if g is None else g.data_ptr() for g in gi]))
    return seen


def assert_own_grad(leaf, z):
    """The leaf is intact (equal to ``z``) and its ``.grad`` has memory of its own."""
    assert torch.equal(leaf.detach(), z), "a leaf's logits were overwritten"
    assert leaf.grad.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr(), \
        ".grad shares the leaf's storage"


def assert_written_in_place(loss, logits, ref_logits, y, leaves, refs, kind):
    """An activation's logits overwritten by the gradient (torch's, from ``ref_logits``,
    the float64 twin), the rest of a ``"view_of_activation"``'s base untouched, and the
    producer's leaves' gradients torch's (``refs``)."""
    ref_logits.retain_grad()
    F.cross_entropy(ref_logits, y).backward()
    loss.backward()
    assert_grad_close(logits.detach(), ref_logits.grad)  # written in place, scaled
    if kind == "view_of_activation":  # the rest of the activation is left alone
        assert torch.equal(logits._base[0], leaves[0].detach()[0] * 2)
    for got, ref in zip(leaves, refs, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-5, atol=1e-6)


def close_to_reference(got, want, rtol):
    """Relative to the reference's largest finite magnitude (gradients hold tiny
    entries), NaN where the reference has NaN."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    finite = torch.isfinite(want)
    scale = float(want[finite].abs().max()) if finite.any() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale + 1e-30,
                               equal_nan=True)


class Identity(torch.autograd.Function):
    """Returns its input as is (autograd makes the output a view of it)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return g


def assert_grad_and_hvp_match_torch(loss, z, y, close, grad_output=None, **kw):
    """crossent's ``d loss / dz`` (``create_graph=True``) and the Hessian-vector product
    ``d(sum g^2)/dz`` against torch's ``F.cross_entropy(z, y, **kw)`` in float64 on the same
    ``z``; returns ``(g, torch's g)`` for further comparisons. ``close(got, want, rtol=,
    atol=)`` is the caller's check."""
    g, = torch.autograd.grad(loss, z, grad_output, create_graph=True)
    hvp, = torch.autograd.grad((g * g).sum(), z)
    zd = z.detach().double().requires_grad_()
    r, = torch.autograd.grad(F.cross_entropy(zd, y, **kw), zd,
                             None if grad_output is None else grad_output.double(),
                             create_graph=True)
    rhvp, = torch.autograd.grad((r * r).sum(), zd)
    close(g, r)
    close(hvp, rhvp, rtol=1e-3, atol=1e-7)
    return g, r


def assert_checkpointed_head_matches_torch(loss_of_logits, x0, w0, y, reentrant, close):
    """``loss_of_logits(F.linear(tanh(x), w))`` inside ``torch.utils.checkpoint`` (the
    logits an activation made inside the region; tanh's saved output makes the
    non-reentrant checkpoint recompute the region): dx and dW against torch's float64."""
    from torch.utils.checkpoint import checkpoint

    def region(x, w):
        return loss_of_logits(F.linear(torch.tanh(x), w))

    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    checkpoint(region, x, w, use_reentrant=reentrant).backward()
    xd, wd = x0.double().requires_grad_(), w0.double().requires_grad_()
    F.cross_entropy(F.linear(torch.tanh(xd), wd), y).backward()
    close(x.grad, xd.grad, atol=1e-6)
    close(w.grad, wd.grad, atol=1e-6)


def assert_save_on_cpu_inplace_loud_or_torchs(loss_of_logits, x0, y, close):
    """``loss_of_logits(exp(x / 2))`` with ``inplace_backward`` under
    ``torch.autograd.graph.save_on_cpu`` (which does not copy CPU tensors, and under which
    torch skips its version check): exp saved its output, the logits; torch's gradient,
    or torch's loud in-place error, never a silently wrong one."""
    from torch.autograd.graph import save_on_cpu

    xd = x0.double().requires_grad_()
    F.cross_entropy((xd * 0.5).exp(), y).backward()
    x = x0.clone().requires_grad_()
    try:
        with save_on_cpu():
            loss = loss_of_logits((x * 0.5).exp())  # exp saves its output
        loss.backward()
    except RuntimeError as exc:  # torch's version-check error: loud, fine
        assert "inplace" in str(exc)
        return
    close(x.grad, xd.grad)


def grad_node_name(loss) -> str:
    """The name of ``loss``'s first backward node that is not a reshape or cast: which
    kernel's Function (or torch op) made it, so a test can assert its route."""
    fn = loss.grad_fn
    while fn is not None and type(fn).__name__ in ("ViewBackward0", "ReshapeAliasBackward0",
                                                   "UnsafeViewBackward0", "ToCopyBackward0"):
        fn = fn.next_functions[0][0]
    return type(fn).__name__


def ref_loss(z, y, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
             z_loss=0.0, softcap=None, num_items=None):
    """torch in float64: ``F.cross_entropy`` on ``softcap * tanh(z / softcap)``, plus
    ``z_loss * lse^2`` per counted row sharing torch's "mean" denominator (the count of
    counted rows, or ``sum_n w[y_n]`` with class weights: crossent's documented rule);
    ``num_items``: the sum divided by it (transformers' ``num_items_in_batch``)."""
    zc = softcap * torch.tanh(z / softcap) if softcap is not None else z
    w = None if weight is None else weight.double().to(z.device)
    red = "sum" if num_items is not None else reduction
    loss = F.cross_entropy(zc, y, w, ignore_index=ignore_index, reduction=red,
                           label_smoothing=label_smoothing)
    if z_loss:
        counted = y != ignore_index
        term = torch.where(counted, z_loss * torch.logsumexp(zc, 1) ** 2, 0.0)
        if red == "none":
            loss = loss + term
        elif red == "sum":
            loss = loss + term.sum()
        else:
            # Liger's reference divides the z-loss by the count of counted rows even with
            # class weights; crossent shares torch's weighted "mean" denominator
            denom = counted.sum() if w is None else w[torch.where(counted, y, 0)][counted].sum()
            loss = loss + term.sum() / denom
    return loss if num_items is None else loss / num_items


def ones_or(grad_output, loss):
    """``grad_output`` in ``loss``'s dtype and device, or ones (``loss.backward()``)."""
    return torch.ones_like(loss) if grad_output is None else grad_output.to(loss)


def ref_ce(z, y, weight=None, grad_output=None, **kw):
    """:func:`ref_loss` on CPU in float64, backward with ``grad_output``: (loss, dz)."""
    leaf = z.detach().double().cpu().requires_grad_()
    loss = ref_loss(leaf, y.cpu(), weight, **kw)
    loss.backward(ones_or(grad_output, loss))
    return loss.detach(), leaf.grad


def ref_linear(x, w, b, y, grad_output=None, *, shift=False, **kw):
    """The unfused head on CPU in float64: ``F.linear`` then :func:`ref_loss` (with
    ``shift``, position ``t`` against ``y[:, t + 1]``, as CCE's and transformers'
    references do): (loss, dx, dW, db)."""
    leaves = [None if t is None else t.detach().double().cpu().requires_grad_()
              for t in (x, w, b)]
    xs, ys = leaves[0], y.cpu()
    if shift:
        xs, ys = xs[:, :-1].reshape(-1, xs.shape[-1]), ys[:, 1:].reshape(-1)
    loss = ref_loss(F.linear(xs, leaves[1], leaves[2]), ys, **kw)
    if shift and kw.get("reduction") == "none":
        loss = loss.reshape(y.shape[0], -1)
    loss.backward(ones_or(grad_output, loss))
    return loss.detach(), *[None if t is None else t.grad for t in leaves]


def assert_same_with_nans(got, want):
    """Equal up to float64 rounding, NaN exactly where the reference is NaN, infinities
    equal, shapes equal (on CPU in float64)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    torch.testing.assert_close(torch.nan_to_num(got, nan=0.0), torch.nan_to_num(want, nan=0.0),
                               rtol=1e-9, atol=1e-12)


def value_and_grad(fn, z0):
    """``fn`` of a fresh leaf copy of ``z0`` and the gradient of its sum."""
    z = z0.clone().requires_grad_()
    loss = fn(z)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss, grad



# ---- the CPU routes of crossent.torch, as the session-16 review files probe them

ROUTES = ("auto", "auto_fused", "small", "native", "rowblock")


_FEW_CLASSES = ("SMALL_MAX_LOGITS", "SMALL_MAX_LOGITS_FLOAT32", "FEW_CLASSES",
                "FEW_CLASSES_NATIVE", "FEW_CLASSES_PROBABILITIES", "SPATIAL_FEW_CLASSES")


def _shipped_thresholds() -> dict:
    """The few-class dispatch thresholds as crossent ships them (read at import, before
    any fixture lowers them)."""
    try:
        from crossent.torch import _backends
    except ImportError:  # no torch: the torch tests are skipped
        return {}
    return {name: getattr(_backends, name) for name in _FEW_CLASSES}


_SHIPPED = _shipped_thresholds()


def use_route(route, monkeypatch) -> str:
    """The ``backend=`` value of a route, after setting the dispatch thresholds it needs
    ("auto" with crossent's shipped thresholds, "auto_fused": the fused kernel at every
    size and class count, "small": the small-batch kernel)."""
    from crossent.torch import _backends

    monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 0 if route == "auto_fused" else 1 << 19)
    for name in _FEW_CLASSES:
        monkeypatch.setattr(_backends, name, 0 if route == "auto_fused" else _SHIPPED[name])
    if route == "small":
        monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1)
    return route if route in ("native", "rowblock") else "auto"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def one_thread():
    """Body of an autouse fixture: torch single-threaded for the test (exact sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- label smoothing with class weights up to the dtype's largest (session-16 wave 3)


def smoothing_weights(kind, dtype, c, device="cpu"):
    """Class weights for ``c <= 5`` classes: None, ``"near_max"`` (0.9 x the dtype's
    largest each; float32's for bfloat16), ``"mixed_huge"`` (two of those of opposite
    signs, then small ones) or moderate weights of mixed signs."""
    if kind is None:
        return None
    big = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max
    if kind == "near_max":
        w = torch.full((c,), 0.9 * big, dtype=torch.float64)
    elif kind == "mixed_huge":
        w = torch.tensor([0.9 * big, -0.9 * big, 1.0, 2.0, -0.5][:c], dtype=torch.float64)
    else:  # mixed, moderate
        w = torch.tensor([1.5, -2.0, 0.3, 4.0, -1.0][:c], dtype=torch.float64)
    return w.to(dtype).to(device)


def smoothed_loss_and_grad(fn, z, y, w, eps, reduction, **kw):
    """``fn``'s loss (float64) and the logits' gradient under a ones ``grad_output``."""
    zz = z.clone().requires_grad_()
    out = fn(zz, y, weight=w, reduction=reduction, label_smoothing=eps, **kw)
    out.backward(torch.ones_like(out))
    return out.detach().double(), zz.grad.double()


class DispatchWrapper(torch.Tensor):
    """A minimal wrapper subclass with its own ``__torch_dispatch__`` (what logging,
    quantisation and tracing tools write): unwraps, runs the op, wraps the results."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype,
                                                   device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        def unwrap(t):
            return t.inner if isinstance(t, DispatchWrapper) else t

        def wrap(t):
            return DispatchWrapper(t) if isinstance(t, torch.Tensor) else t

        return tree_map(wrap, func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {})))


def same_nonfinite_pattern(a: torch.Tensor, b: torch.Tensor) -> bool:
    """NaN where ``b`` has NaN and inf where it has inf (torch's pattern)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())


def relative_error(g: torch.Tensor, ref: torch.Tensor) -> float:
    """``|g - ref| / |ref|`` (Frobenius norms) in float64."""
    return ((g.double() - ref).norm() / ref.norm()).item()


def inplace_outcome(fn) -> str:
    """``"ok"``, ``"raise"`` (torch's or crossent's in-place ``RuntimeError``) or the
    other error's text."""
    try:
        fn()
    except RuntimeError as exc:
        text = str(exc)
        if "inplace" in text or "in place" in text:
            return "raise"
        return f"RuntimeError: {text[:120]}"
    return "ok"


def grads_or_raise(run):
    """``run()`` (the gradients it returns), or ``"raise"`` for torch's or crossent's
    "modified by an inplace operation" error; any other error propagates."""
    try:
        return run()
    except RuntimeError as exc:
        if "modified by an inplace operation" in str(exc):
            return "raise"
        raise


def assert_same_grads_or_raise(got, want, rtol: float = 1e-5) -> None:
    """Both ``"raise"``, or gradients close to ``want`` (:func:`grads_or_raise`'s)."""
    if isinstance(want, str) or isinstance(got, str):
        assert got == want
        return
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=1e-6)


def same_inplace_outcome(build) -> str:
    """``build("xt")`` and ``build("torch")`` end alike (both refuse an in-place change
    before backward, or neither does); that outcome."""
    got, want = inplace_outcome(lambda: build("xt")), inplace_outcome(lambda: build("torch"))
    assert got == want, (got, want)
    return got
