"""``statistics=`` on ``cross_entropy`` and ``linear_cross_entropy``: per-token lse, z-loss
term, target log-probability, argmax accuracy and entropy from the loss's own pass, against
an independent float64 reference built from the whole logits with plain torch
(``torch.logsumexp``, ``log_softmax``, ``argmax``, ``Categorical.entropy``), on every
route (row-block kernel with several chunks and blocks, torch's kernel, the composable
path; Triton refuses), with the loss and its gradients unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fused_testing import close

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch import _backends, _cross_entropy, _linear, _rules

ALL = ("lse", "z_loss", "target_logprob", "accuracy", "entropy")
N, C, D = 53, 37, 6
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5}


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """16-row kernel blocks: several blocks per call, shared out to the worker threads."""
    monkeypatch.setattr(_rules, "_BLOCK_BYTES", 16 * 4 * C)


def reference(z, target, *, ignore_index=-100, softcap=None, z_loss=0.0):
    """float64 statistics of whole logits ``z`` (N, C), independent of crossent."""
    z = z.detach().double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, 1)
    ent = torch.distributions.Categorical(logits=z, validate_args=False).entropy()
    out = {"lse": lse, "z_loss": z_loss * lse**2, "entropy": ent}
    if target.is_floating_point():
        return out, torch.ones(z.shape[0], dtype=torch.bool)
    counted = target != ignore_index
    y = torch.where(counted, target, 0)
    out["target_logprob"] = torch.log_softmax(z, 1).gather(1, y[:, None])[:, 0]
    out["accuracy"] = z.argmax(1) == y
    for k, v in out.items():
        out[k] = torch.where(counted, v, False if v.dtype == torch.bool else torch.nan)
    return out, counted


def check(stats, want, counted, dtype, names=ALL):
    assert isinstance(stats, xt.TokenStatistics)
    assert torch.equal(stats.counted, counted)
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name in ALL:
        got = getattr(stats, name)
        if name not in names:
            assert got is None, name
            continue
        assert got.shape == counted.shape and not got.requires_grad, name
        if name == "accuracy":
            assert got.dtype == torch.bool
            assert torch.equal(got, want[name]), name
        else:
            assert got.dtype == cdtype, name
            assert torch.equal(got.isnan(), want[name].isnan()), name
            close(got, want[name], rtol=TOL[dtype])


def data(dtype=torch.float64, n=N, seed=0, ignored=True):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(n, C, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, C, (n,), generator=g)
    y[::3] = z[::3].double().argmax(1)  # some rows right, so accuracy has both values
    if ignored:
        y[1::4] = -100
    return z, y


OPTIONS = [
    dict(),
    dict(label_smoothing=0.1, weight=True),
    dict(z_loss=1e-2, softcap=5.0),
    dict(z_loss=1e-3, label_smoothing=0.2, weight=True, softcap=4.0),
]


def _kw(kw, dtype):
    if kw.get("weight"):
        g = torch.Generator().manual_seed(9)
        kw = dict(kw, weight=(torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype))
    return kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kw", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_statistics_match_float64(dtype, kw, reduction):
    z, y = data(dtype)
    kw = _kw(kw, dtype)
    leaf = z.clone().requires_grad_()
    loss, stats = xt.cross_entropy(leaf, y, reduction=reduction, statistics=ALL, **kw)
    want, counted = reference(z, y, softcap=kw.get("softcap"), z_loss=kw.get("z_loss", 0.0))
    check(stats, want, counted, dtype)
    # the loss and its gradient are the ones without statistics, bit for bit
    plain_leaf = z.clone().requires_grad_()
    plain = xt.cross_entropy(plain_leaf, y, reduction=reduction, **kw)
    assert torch.equal(loss, plain)
    loss.sum().backward()
    plain.sum().backward()
    assert torch.equal(leaf.grad, plain_leaf.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("names", [("lse",), ("entropy",), ("accuracy", "z_loss"),
                                   ("target_logprob",), ()])
def test_any_subset_other_fields_none(dtype, names):
    z, y = data(dtype)
    with torch.no_grad():
        _, stats = xt.cross_entropy(z, y, statistics=names, z_loss=0.1)
    want, counted = reference(z, y, z_loss=0.1)
    check(stats, want, counted, dtype, names)


def test_single_name_and_order_and_duplicates():
    z, y = data()
    _, one = xt.cross_entropy(z, y, statistics="entropy")
    _, many = xt.cross_entropy(z, y, statistics=["entropy", "lse", "entropy"])
    assert one.lse is None
    torch.testing.assert_close(one.entropy, many.entropy, rtol=0, atol=0, equal_nan=True)
    assert many.lse is not None


@pytest.mark.parametrize("bad", ["logits", ("lse", "loss"), 3, (1,), True, {"lse": 1}.keys()])
def test_bad_names_raise_input_error_naming_statistics(bad):
    z, y = data()
    if isinstance(bad, type({}.keys())):  # a dict view of good names is fine
        xt.cross_entropy(z, y, statistics=bad)
        return
    with pytest.raises(InputError, match="statistics"):
        xt.cross_entropy(z, y, statistics=bad)
    x, w = torch.randn(N, D, dtype=torch.float64), torch.randn(C, D, dtype=torch.float64)
    with pytest.raises(InputError, match="statistics"):
        xt.linear_cross_entropy(x, w, y, statistics=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kw", [dict(), dict(z_loss=0.05, label_smoothing=0.1, softcap=6.0)])
def test_probability_targets_lse_z_loss_entropy(dtype, kw):
    z, _ = data(dtype)
    g = torch.Generator().manual_seed(3)
    t = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), 1).to(dtype)
    names = ("lse", "z_loss", "entropy")
    _, stats = xt.cross_entropy(z.clone().requires_grad_(), t, statistics=names, **kw)
    want, counted = reference(z, t, softcap=kw.get("softcap"), z_loss=kw.get("z_loss", 0.0))
    check(stats, want, counted, dtype, names)
    for bad in ("target_logprob", "accuracy"):
        with pytest.raises(UnsupportedError, match=bad):
            xt.cross_entropy(z, t, statistics=("lse", bad))
        x, w = torch.randn(N, D, dtype=dtype), torch.randn(C, D, dtype=dtype)
        with pytest.raises(UnsupportedError, match=bad):
            xt.linear_cross_entropy(x, w, t, statistics=(bad,))


def test_argmax_ties_take_the_first_maximum():
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0]] * 3)
    y = torch.tensor([1, 2, 3])
    _, stats = xt.cross_entropy(z, y, statistics="accuracy")
    assert stats.accuracy.tolist() == [True, False, False]


@pytest.mark.parametrize("route", ["native", "composite", "rowblock"])
def test_every_route_gives_the_same_statistics(route, monkeypatch):
    z, y = data(torch.float32)
    leaf = z.clone().requires_grad_()
    if route == "native":
        monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 1 << 30)
        loss, stats = xt.cross_entropy(leaf, y, statistics=ALL)
    elif route == "composite":  # forward-mode AD takes the composable path
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            dual = fwAD.make_dual(z.clone(), torch.ones_like(z))
            loss, stats = xt.cross_entropy(dual, y, statistics=ALL)
            assert fwAD.unpack_dual(loss).tangent is not None
    else:
        loss, stats = xt.cross_entropy(leaf, y, statistics=ALL)
    want, counted = reference(z, y)
    check(stats, want, counted, torch.float32)
    close(loss, F.cross_entropy(z.double(), y))


def test_composite_route_with_softcap_and_z_loss():
    """A class weight that requires grad takes the composable path with probability
    targets; its statistics are the kernel's definitions."""
    z, _ = data()
    t = torch.softmax(torch.randn(N, C, dtype=torch.float64), 1)
    w = torch.rand(C, dtype=torch.float64, requires_grad=True)
    _, stats = xt.cross_entropy(z, t, w, z_loss=0.1, softcap=3.0,
                                statistics=("lse", "z_loss", "entropy"))
    want, counted = reference(z, t, softcap=3.0, z_loss=0.1)
    check(stats, want, counted, torch.float64, ("lse", "z_loss", "entropy"))


def test_triton_refuses_statistics_by_name(monkeypatch):
    monkeypatch.setattr(_backends, "_triton_unusable", lambda call: None)
    z, y = data(torch.float32)
    with pytest.raises(UnsupportedError, match="statistics"):
        xt.cross_entropy(z, y, backend="triton", statistics=("lse",))
    x, w = torch.randn(N, D), torch.randn(C, D)
    with pytest.raises(UnsupportedError, match="statistics"):
        xt.linear_cross_entropy(x, w, y, backend="triton", statistics=("entropy",))


def test_statistics_none_runs_the_kernel_as_before(monkeypatch):
    """No ``lse_out``, no observer: the same kernel call as without the option."""
    calls = []
    real = _cross_entropy.cross_entropy_rows

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(_cross_entropy, "cross_entropy_rows", spy)
    monkeypatch.setattr(_linear, "cross_entropy_rows", spy)
    z, y = data(torch.float32)
    out = xt.cross_entropy(z.requires_grad_(), y, statistics=None)
    assert isinstance(out, torch.Tensor)
    x, w = torch.randn(N, D), torch.randn(C, D, requires_grad=True)
    assert isinstance(xt.linear_cross_entropy(x, w, y, chunk_size=8), torch.Tensor)
    assert calls and all("lse_out" not in k and "observe" not in k for k in calls)


def test_ignored_rows_all_ignored_and_empty():
    z, y = data(torch.float32)
    y[:] = -100
    loss, stats = xt.cross_entropy(z, y, statistics=ALL)
    assert loss.isnan()  # 0/0 as torch
    assert not stats.counted.any() and not stats.accuracy.any()
    assert all(getattr(stats, n).isnan().all() for n in ALL if n != "accuracy")
    loss, stats = xt.cross_entropy(torch.zeros(0, C), torch.zeros(0, dtype=torch.long),
                                   reduction="sum", statistics=ALL)
    assert loss == 0 and all(getattr(stats, n).shape == (0,) for n in (*ALL, "counted"))
    x, w = torch.randn(N, D), torch.randn(C, D, requires_grad=True)
    loss, stats = xt.linear_cross_entropy(x, w, y, chunk_size=8, reduction="sum",
                                          statistics=ALL)
    assert loss == 0 and not stats.counted.any() and stats.lse.isnan().all()
    loss, stats = xt.linear_cross_entropy(x[:0], w, y[:0], chunk_size=8, statistics=ALL)
    assert stats.entropy.shape == (0,)


def test_other_ignore_index_and_k_dimensional_shapes():
    z, y = data(torch.float64)
    y[y == -100] = 5
    z3 = z.reshape(N, 1, C).movedim(2, 1)  # (N, C, 1)
    _, stats = xt.cross_entropy(z3, y[:, None], ignore_index=5, statistics=ALL)
    want, counted = reference(z, y, ignore_index=5)
    assert stats.lse.shape == (N, 1)
    check(xt.TokenStatistics(*(t[:, 0] if t is not None else None for t in stats)), want,
          counted, torch.float64)
    _, one = xt.cross_entropy(z[0], y[0], statistics=("lse",))
    assert one.lse.shape == () and torch.allclose(one.lse, torch.logsumexp(z[0], 0))


def test_entropy_precise_for_large_logits():
    """``-sum p log p`` from the probabilities: no cancellation between ``lse`` and
    ``sum p z`` when the logits are large."""
    g = torch.Generator().manual_seed(1)
    z = 200.0 + 2 * torch.randn(64, 1000, generator=g)
    y = torch.randint(0, 1000, (64,), generator=g)
    _, stats = xt.cross_entropy(z, y, statistics="entropy")
    want = torch.distributions.Categorical(logits=z.double()).entropy()
    torch.testing.assert_close(stats.entropy.double(), want, rtol=1e-5, atol=1e-5)


# ---- the linear head


def linear_data(dtype=torch.float64, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(C, D, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    logits = F.linear(x, w, b)  # in the input dtype: the logits the head sees
    y = torch.randint(0, C, (n,), generator=g)
    y[::3] = logits[::3].double().argmax(1)
    y[1::4] = -100
    return x, w, b, y, logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kw", OPTIONS)
@pytest.mark.parametrize("reduction,chunk", [("mean", 8), ("none", 40), ("sum", None)])
def test_linear_statistics_match_float64(dtype, kw, reduction, chunk):
    x, w, b, y, logits = linear_data(dtype)
    kw = _kw(kw, dtype)
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    loss, stats = xt.linear_cross_entropy(*leaves[:2], y, leaves[2], chunk_size=chunk,
                                          reduction=reduction, statistics=ALL, **kw)
    want, counted = reference(logits, y, softcap=kw.get("softcap"),
                              z_loss=kw.get("z_loss", 0.0))
    check(stats, want, counted, dtype)
    plain_leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    plain = xt.linear_cross_entropy(*plain_leaves[:2], y, plain_leaves[2],
                                    chunk_size=chunk, reduction=reduction, **kw)
    assert torch.equal(loss, plain)
    loss.sum().backward()
    plain.sum().backward()
    for a, p in zip(leaves, plain_leaves, strict=True):
        assert torch.equal(a.grad, p.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_probability_targets(dtype):
    x, w, b, _, logits = linear_data(dtype)
    t = torch.softmax(torch.randn(N, C, dtype=torch.float64), 1).to(dtype)
    names = ("lse", "z_loss", "entropy")
    _, stats = xt.linear_cross_entropy(x, w.requires_grad_(), t, b, chunk_size=8,
                                       z_loss=0.01, statistics=names)
    want, counted = reference(logits, t, z_loss=0.01)
    check(stats, want, counted, dtype, names)
    # a target that requires grad takes the composable path: same statistics
    _, comp = xt.linear_cross_entropy(x, w, t.clone().requires_grad_(), b, z_loss=0.01,
                                      statistics=names)
    check(comp, want, counted, dtype, names)


@pytest.mark.native_dispatch
def test_linear_native_route_small_input():
    x, w, b, y, logits = linear_data(torch.float32, n=9)
    loss, stats = xt.linear_cross_entropy(x, w.requires_grad_(), y, b, statistics=ALL)
    want, counted = reference(logits, y)
    check(stats, want, counted, torch.float32)
    close(loss, F.cross_entropy(logits.double(), y))


def test_linear_shift_single_and_k_dimensional_shapes():
    x, w, b, y, _ = linear_data()
    hidden, tokens = x[:50].reshape(5, 10, D), y[:50].reshape(5, 10)
    loss, stats = xt.linear_cross_entropy(hidden, w, tokens, b, shift=True, reduction="none",
                                          statistics=ALL)
    assert loss.shape == stats.lse.shape == stats.counted.shape == (5, 9)
    want, counted = reference(F.linear(hidden[:, :-1], w, b).reshape(-1, C),
                              tokens[:, 1:].reshape(-1))
    check(xt.TokenStatistics(*(t.reshape(-1) for t in stats)), want, counted, torch.float64)
    _, one = xt.linear_cross_entropy(x[0], w, y[0], b, statistics=("lse",))
    assert one.lse.shape == ()
    wk = w.reshape(C, 1, D)
    _, kdim = xt.linear_cross_entropy(x, wk, y[:, None], b[:, None], statistics=ALL)
    want, counted = reference(F.linear(x, w, b), y)
    assert kdim.lse.shape == (N, 1)
    check(xt.TokenStatistics(*(t[:, 0] for t in kdim)), want, counted, torch.float64)


def test_linear_ignored_rows_with_non_finite_features_still_counted_right():
    """Ignored rows with inf features are not skipped (NaN must reach dW as in torch);
    their statistics are still NaN/False."""
    x, w, b, y, _ = linear_data()
    x = x.clone()
    x[1] = torch.inf  # y[1] is ignored
    _, stats = xt.linear_cross_entropy(x, w, y, b, chunk_size=8, statistics=ALL)
    want, counted = reference(F.linear(x, w, b), y)
    check(stats, want, counted, torch.float64)


def test_torch_func_transforms_take_the_composable_path():
    """``torch.func.grad(..., has_aux=True)`` and ``vmap`` (aux leaves must be tensors:
    return the fields, not the tuple with its ``None``)."""
    z, y = data()

    def loss_and_lse(z):
        loss, stats = xt.cross_entropy(z, y, statistics=("lse", "accuracy"))
        return loss, (stats.lse, stats.accuracy)

    grad, (lse, acc) = torch.func.grad(loss_and_lse, has_aux=True)(z)
    want, _ = reference(z, y)
    close(lse, want["lse"], rtol=1e-12)
    assert torch.equal(acc, want["accuracy"])
    close(grad, torch.func.grad(lambda z: F.cross_entropy(z, y))(z), rtol=1e-12)
    batch = torch.stack([z, 2 * z])
    lses = torch.func.vmap(lambda z: loss_and_lse(z)[1][0])(batch)
    close(lses[1], reference(2 * z, y)[0]["lse"], rtol=1e-12)


def test_inplace_backward_statistics_before_the_gradient_overwrites():
    z, y = data(torch.float32)
    buf = z.clone().requires_grad_()
    logits = buf * 1.0  # a non-leaf the kernel may overwrite
    _, stats = xt.cross_entropy(logits, y, statistics=ALL, inplace_backward=True)
    want, counted = reference(z, y)
    check(stats, want, counted, torch.float32)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_logprob_where_p_y_underflows(dtype, smoothing):
    """``p_y`` below float32's range: ``log p_y = z_y - lse`` (the kernel's rule), still
    the float64 reference's value; ``accuracy`` of a huge winning logit is True."""
    z, y = data(dtype, ignored=False)
    z = z.clone()
    rows = torch.arange(0, N, 5)
    z[rows, y[rows]] = -120.0  # p_y ~ e^-120: 0 in float32
    z[rows + 1, y[rows + 1]] = 90.0
    _, stats = xt.cross_entropy(z, y, statistics=ALL, label_smoothing=smoothing)
    want, counted = reference(z, y)
    check(stats, want, counted, dtype)
    assert stats.accuracy[rows + 1].all()


def test_counted_mask_is_the_callers_own():
    """Changing ``stats.counted`` in place does not change the backward."""
    x, w, b, y, _ = linear_data()
    leaf = w.clone().requires_grad_()
    loss, stats = xt.linear_cross_entropy(x, leaf, y, b, chunk_size=8, reduction="none",
                                          statistics=("lse",))
    stats.counted.fill_(True)
    loss.sum().backward()
    ref = w.clone().requires_grad_()
    F.cross_entropy(F.linear(x, ref, b), y, reduction="sum").backward()
    close(leaf.grad, ref.grad, rtol=1e-12)


def test_modules_pass_statistics_through():


    g = torch.Generator().manual_seed(1)
    z = torch.randn(9, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (9,), generator=g)
    loss, stats = xt.CrossEntropyLoss()(z, y, statistics=("lse", "accuracy"))
    torch.testing.assert_close(loss, F.cross_entropy(z, y))
    torch.testing.assert_close(stats.lse, torch.logsumexp(z, 1))
    assert torch.equal(stats.accuracy, z.argmax(1) == y)
    head = xt.LinearCrossEntropyLoss(5, 7, dtype=torch.float64)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    loss, stats = head(x, y, statistics="entropy")
    logits = F.linear(x, head.linear.weight, head.linear.bias)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y))
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(stats.entropy, -(p * p.log()).sum(1), rtol=1e-6, atol=1e-9)
    assert stats.lse is None
