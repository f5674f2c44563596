"""Review (H67) of ``statistics=`` on ``crossent.torch.cross_entropy`` and
``linear_cross_entropy``: every CPU backend ("native", "rowblock", "auto" both ways) and
option, shapes (K-dimensional, 1-D, shifted, empty), dtypes, views, ragged blocks and
chunks, non-finite logits, argmax ties, the names argument, detachment, modules and
threads, against an independent float64 reference from the whole logits
(``torch.logsumexp``, ``torch.log_softmax``, ``torch.argmax``, ``torch.special.entr``)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch import _rules

ALL = ("lse", "z_loss", "target_logprob", "accuracy", "entropy")
PROB = ("lse", "z_loss", "entropy")
BACKENDS = ["native", "rowblock", "auto"]
INF, NAN = math.inf, math.nan
LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """16-row kernel blocks (the minimum) for up to 64 classes: several blocks per call,
    the last one ragged, shared out to the worker threads."""
    monkeypatch.setattr(_rules, "_BLOCK_BYTES", 16 * 4 * 64)


def reference(z, y=None, *, ignore_index=-100, softcap=None, z_loss=0.0):
    """float64 statistics of whole (M, C) logits, independent of crossent."""
    z = z.detach().double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, 1)
    out = {"lse": lse,
           "z_loss": z_loss * lse.square() if z_loss else torch.zeros_like(lse),
           "entropy": torch.special.entr(torch.softmax(z, 1)).sum(1)}
    if y is None:
        return out, torch.ones(z.shape[0], dtype=torch.bool)
    counted = y != ignore_index
    yy = torch.where(counted, y, 0).long()
    out["target_logprob"] = torch.log_softmax(z, 1).gather(1, yy[:, None])[:, 0]
    out["accuracy"] = z.argmax(1) == yy
    for k, v in out.items():
        out[k] = torch.where(counted, v, False if v.dtype == torch.bool else NAN)
    return out, counted


def check(stats, want, counted, dtype=torch.float32, tol=1e-5, shape=None):
    assert isinstance(stats, xt.TokenStatistics)
    shape = tuple(counted.shape) if shape is None else shape
    assert stats.counted.dtype == torch.bool and tuple(stats.counted.shape) == shape
    assert torch.equal(stats.counted.reshape(-1), counted.reshape(-1))
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name in ALL:
        got = getattr(stats, name)
        if name not in want:
            assert got is None, name
            continue
        assert tuple(got.shape) == shape, name
        assert not got.requires_grad and got.grad_fn is None, name
        got = got.reshape(-1)
        ref = want[name].reshape(-1)
        if name == "accuracy":
            assert got.dtype == torch.bool and torch.equal(got, ref), name
            continue
        assert got.dtype == cdtype, name
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol, equal_nan=True,
                                   msg=name)


def pick(want, names):
    return {k: v for k, v in want.items() if k in names}


# ---- non-finite, huge and tied logits


ROWS = [[INF, 1.0, 0.0], [-INF, -INF, -INF], [NAN, 0.0, 1.0], [1e38, 3e38, -1e38],
        [0.0, -INF, 2.0], [5.0, 5.0, 5.0], [-INF, 3.0, -INF], [1.0, INF, INF],
        [-INF, 0.0, 1.0], [2.0, 7.0, 7.0], [0.0, -30.0, -60.0]]
ROW_TARGETS = [1, 0, 1, 1, 1, 2, 0, 0, 0, 2, 2]


@pytest.mark.native_dispatch
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16,
                                   torch.float16])
@pytest.mark.parametrize("kw", [{}, {"z_loss": 0.1}, {"softcap": 2.0},
                                {"label_smoothing": 0.1, "weight": [1.0, 2.0, 0.0]}])
def test_index_targets_non_finite_huge_and_tied_rows(backend, dtype, kw):
    if backend == "native" and ("z_loss" in kw or "softcap" in kw):
        return
    z = torch.tensor(ROWS).to(dtype)
    y = torch.tensor(ROW_TARGETS)
    if "weight" in kw:
        kw = dict(kw, weight=torch.tensor(kw["weight"], dtype=dtype))
    _, stats = xt.cross_entropy(z, y, reduction="none", backend=backend, statistics=ALL,
                                **kw)
    want, counted = reference(z, y, softcap=kw.get("softcap"), z_loss=kw.get("z_loss", 0.0))
    if dtype != torch.float64:  # the statistics are float32: lse^2 of 3e38 overflows
        want["z_loss"] = want["z_loss"].float().double()
    check(stats, want, counted, dtype, tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_ties_take_the_first_also_after_softcap_and_in_bfloat16(backend):
    # softcap 1: tanh(30) and tanh(40) are both 1.0 (float32 and float64): tied, class 0
    z = torch.tensor([[30.0, 40.0, 0.0], [1.0, 3.0, 3.0], [-INF, -INF, -INF],
                      [0.0, 0.0, 0.0], [-0.0, 0.0, -1.0], [2.0, 2.001, 0.0]])
    y = torch.tensor([1, 2, 0, 0, 1, 1])
    kw = {} if backend == "native" else {"softcap": 1.0}
    for dtype in (torch.float32, torch.bfloat16):  # 2.0 and 2.001 tie in bfloat16
        zz = z.to(dtype)
        _, stats = xt.cross_entropy(zz, y, backend=backend, statistics="accuracy", **kw)
        want, counted = reference(zz, y, softcap=kw.get("softcap"))
        check(stats, pick(want, ["accuracy"]), counted, dtype)
    _, stats = xt.cross_entropy(z[1:], y[1:], backend=backend, statistics="accuracy")
    assert stats.accuracy.tolist() == [False, True, True, False, True]


def test_entropy_of_zero_probability_classes_counts_zero():
    z = torch.tensor([[0.0, -INF, -INF, 1.0], [-INF, -INF, 4.0, -INF], [0.0, -200.0, 0.0, 0.0]],
                     dtype=torch.float64)
    want = torch.special.entr(torch.softmax(z, 1)).sum(1)
    assert want[1] == 0.0
    for backend in BACKENDS:
        for t in (torch.tensor([0, 2, 1]), torch.softmax(torch.zeros(3, 4), 1).double()):
            _, stats = xt.cross_entropy(z, t, backend=backend, statistics="entropy")
            assert torch.equal(stats.entropy.isnan(), torch.zeros(3, dtype=torch.bool))
            torch.testing.assert_close(stats.entropy, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_probability_targets_finite_rows_and_every_option(backend, dtype):
    g = torch.Generator().manual_seed(1)
    z = (3 * torch.randn(37, 9, generator=g)).to(dtype)
    z[3, 2], z[5] = -INF, torch.tensor([1e38, 3e38, -1e38, 0, 0, 0, 0, 0, 0])
    if dtype == torch.float16:
        z[5] = 0.0
    t = torch.softmax(torch.randn(37, 9, generator=g), 1).to(dtype)
    t[7] = 0.0
    for kw in ({}, {"label_smoothing": 0.2, "weight": torch.rand(9, generator=g).to(dtype)},
               {"z_loss": 0.05, "softcap": 3.0}):
        if backend == "native" and "z_loss" in kw:
            continue
        _, stats = xt.cross_entropy(z, t, backend=backend, statistics=PROB, **kw)
        want, counted = reference(z, softcap=kw.get("softcap"), z_loss=kw.get("z_loss", 0.0))
        check(stats, want, counted, dtype)
        for bad in ("accuracy", ("lse", "target_logprob")):
            with pytest.raises(UnsupportedError, match="statistics"):
                xt.cross_entropy(z, t, backend=backend, statistics=bad, **kw)


@pytest.mark.parametrize("row", [[INF, 1.0, 0.0], [-INF, -INF, -INF], [1.0, INF, -INF]])
@pytest.mark.parametrize("backend", ["rowblock", "auto"])
def test_probability_targets_lse_of_infinite_rows_is_logsumexp(row, backend):
    z = torch.tensor([row, [0.0, 1.0, 2.0]])
    t = torch.full((2, 3), 1 / 3)
    _, stats = xt.cross_entropy(z, t, backend=backend, statistics="lse")
    want = torch.logsumexp(z.double(), 1)
    assert want[0].isinf()
    assert stats.lse[0].item() == want[0].item()


def test_probability_targets_lse_of_infinite_rows_native_route_is_torchs():
    z = torch.tensor([[INF, 1.0, 0.0], [-INF, -INF, -INF]])
    _, stats = xt.cross_entropy(z, torch.full((2, 3), 1 / 3), backend="native",
                                statistics="lse")
    assert stats.lse.tolist() == [INF, -INF]


def test_linear_probability_targets_lse_of_infinite_rows_is_logsumexp():
    x = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [0.5, 2.0]])
    w = torch.tensor([[-INF, 1.0], [-INF, 1.0], [-INF, 2.0]])
    logits = x @ w.T  # row 0: all -inf; row 1: all +inf; row 2: all -inf
    want = torch.logsumexp(logits.double(), 1)
    assert want.tolist() == [-INF, INF, -INF]
    t = torch.full((3, 3), 1 / 3)
    _, native = xt.linear_cross_entropy(x, w, t, backend="native", statistics="lse")
    assert native.lse.tolist() == want.tolist()
    _, stats = xt.linear_cross_entropy(x, w, t, backend="rowblock", chunk_size=2,
                                       statistics="lse")
    assert stats.lse.tolist() == want.tolist()


# ---- shapes, views, ignore_index, dtypes


@pytest.mark.native_dispatch
@pytest.mark.parametrize("backend", BACKENDS)
def test_k_dimensional_permuted_expanded_and_unbatched(backend):
    g = torch.Generator().manual_seed(2)
    n, c, d1, d2 = 3, 5, 4, 6
    z = torch.randn(n, d1, d2, c, generator=g).permute(0, 3, 1, 2)  # non-contiguous
    y = torch.randint(0, c, (1, d1, d2), generator=g).expand(n, d1, d2)
    ign = int(y[0, 0, 0])
    for dtype in (torch.float32, torch.bfloat16):
        zz = z.to(dtype)
        _, stats = xt.cross_entropy(zz, y, ignore_index=ign, backend=backend, statistics=ALL)
        want, counted = reference(zz.movedim(1, -1).reshape(-1, c), y.reshape(-1),
                                  ignore_index=ign)
        check(stats, want, counted, dtype, shape=(n, d1, d2))
    # probability targets (N, C, d1)
    zp = torch.randn(n, c, d1, generator=g)
    tp = torch.softmax(torch.randn(n, c, d1, generator=g), 1)
    _, stats = xt.cross_entropy(zp, tp, backend=backend, statistics=PROB)
    want, counted = reference(zp.movedim(1, -1).reshape(-1, c))
    check(stats, want, counted, shape=(n, d1))
    # 1-D input, index and probability targets, counted and ignored
    for yy in (torch.tensor(3), torch.tensor(-100)):
        _, stats = xt.cross_entropy(zp[0, :, 0], yy, backend=backend, statistics=ALL)
        want, counted = reference(zp[0, :, 0][None], yy[None])
        check(stats, want, counted, shape=())
    _, stats = xt.cross_entropy(zp[0, :, 0], tp[0, :, 0], backend=backend, statistics=PROB)
    check(stats, reference(zp[0, :, 0][None])[0], torch.ones(1, dtype=torch.bool), shape=())
    # stride-0 rows, strided slices, int32 targets
    ze = torch.randn(1, c, generator=g).expand(40, c)
    ye = torch.randint(0, c, (40,), generator=g, dtype=torch.int32)
    _, stats = xt.cross_entropy(ze, ye, backend=backend, statistics=ALL)
    check(stats, *reference(ze, ye))
    zs = torch.randn(80, 2 * c, generator=g)[::2, 1::2]
    _, stats = xt.cross_entropy(zs, ye.long(), backend=backend, statistics=ALL)
    check(stats, *reference(zs, ye.long()))


@pytest.mark.native_dispatch
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, 0, 4, -1, 99])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_custom_ignore_index_and_all_ignored(backend, ignore_index, reduction):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(41, 7, generator=g)
    y = torch.randint(0, 7, (41,), generator=g)
    y[::3] = ignore_index
    _, stats = xt.cross_entropy(z, y, ignore_index=ignore_index, reduction=reduction,
                                backend=backend, statistics=ALL)
    check(stats, *reference(z, y, ignore_index=ignore_index))
    y_all = torch.full((41,), ignore_index)
    loss, stats = xt.cross_entropy(z, y_all, ignore_index=ignore_index, reduction=reduction,
                                   backend=backend, statistics=ALL)
    torch_loss = torch.nn.functional.cross_entropy(z, y_all, ignore_index=ignore_index,
                                                   reduction=reduction)
    torch.testing.assert_close(loss, torch_loss, equal_nan=True)
    assert not stats.counted.any() and not stats.accuracy.any()
    for name in ("lse", "z_loss", "target_logprob", "entropy"):
        assert getattr(stats, name).isnan().all(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches(backend):
    for z, y in ((torch.randn(0, 4), torch.zeros(0, dtype=torch.long)),
                 (torch.randn(0, 4, 3), torch.zeros(0, 3, dtype=torch.long)),
                 (torch.randn(2, 4, 0), torch.zeros(2, 0, dtype=torch.long))):
        _, stats = xt.cross_entropy(z, y, backend=backend, statistics=ALL)
        assert all(t.shape == y.shape for t in stats)


# ---- options leave the loss alone; z_loss is the loss's own term; detachment


@pytest.mark.parametrize("backend", ["rowblock", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_statistics_do_not_change_loss_or_gradient(backend, dtype):
    g = torch.Generator().manual_seed(4)
    z = (2 * torch.randn(45, 11, generator=g)).to(dtype)
    y = torch.randint(0, 11, (45,), generator=g)
    y[::4] = -100
    t = torch.softmax(torch.randn(45, 11, generator=g), 1).to(dtype)
    for target, names in ((y, ALL), (t, PROB)):
        for reduction in ("mean", "none"):
            for kw in ({}, {"z_loss": 0.01, "softcap": 4.0, "label_smoothing": 0.1}):
                a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
                la = xt.cross_entropy(a, target, reduction=reduction, backend=backend, **kw)
                lb, stats = xt.cross_entropy(b, target, reduction=reduction, backend=backend,
                                             statistics=names, **kw)
                la.sum().backward()
                lb.sum().backward()
                assert torch.equal(la, lb) and torch.equal(a.grad, b.grad)
                want, counted = reference(z, None if target is t else y,
                                          softcap=kw.get("softcap"),
                                          z_loss=kw.get("z_loss", 0.0))
                check(stats, want, counted, dtype, tol=1e-5 if dtype != torch.float64 else 1e-10)


@pytest.mark.parametrize("backend", ["rowblock", "auto"])
def test_z_loss_statistic_is_what_the_loss_adds(backend):
    g = torch.Generator().manual_seed(5)
    z = 4 * torch.randn(20, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (20,), generator=g)
    y[::5] = -100
    t = torch.softmax(torch.randn(20, 7, generator=g, dtype=torch.float64), 1)
    for target in (y, t):
        for kw in ({}, {"label_smoothing": 0.2, "weight": torch.rand(7, dtype=torch.float64)},
                   {"softcap": 2.0}):
            plain = xt.cross_entropy(z, target, reduction="none", backend=backend, **kw)
            with_z, stats = xt.cross_entropy(z, target, reduction="none", backend=backend,
                                             z_loss=0.3, statistics="z_loss", **kw)
            diff = torch.where(stats.counted, with_z - plain, NAN)
            torch.testing.assert_close(stats.z_loss, diff, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_are_detached_on_every_autograd_path(backend):
    import torch.autograd.forward_ad as fwAD

    z = torch.randn(6, 5)
    y = torch.tensor([0, 1, -100, 3, 4, 2])
    leaf = z.clone().requires_grad_()
    loss, stats = xt.cross_entropy(leaf * 2, y, backend=backend, statistics=ALL)
    assert all(not s.requires_grad and s.grad_fn is None for s in stats)
    (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
    assert grad.requires_grad
    with fwAD.dual_level():
        dual = fwAD.make_dual(z, torch.randn(6, 5))
        loss, stats = xt.cross_entropy(dual, y, backend=backend, statistics=ALL)
        assert fwAD.unpack_dual(loss).tangent is not None
        assert all(fwAD.unpack_dual(s).tangent is None for s in stats)
    with torch.no_grad():
        _, quiet = xt.cross_entropy(leaf, y, backend=backend, statistics=ALL)
    with torch.inference_mode():
        _, infer = xt.cross_entropy(z, y, backend=backend, statistics=ALL)
    want, counted = reference(z, y)
    for got in (stats, quiet, infer):  # forward AD takes the composable path
        check(got, want, counted)


# ---- the names argument


@pytest.mark.parametrize("names,fields", [
    (("lse", "lse"), ["lse"]), ([], []), ((), []), ("lse", ["lse"]),
    (["entropy", "lse", "accuracy"], ["lse", "accuracy", "entropy"]),
    ({"entropy"}, ["entropy"]), (frozenset(["accuracy"]), ["accuracy"]),
    (np.array(["lse", "entropy"]), ["lse", "entropy"]), (np.str_("z_loss"), ["z_loss"]),
    ({"target_logprob": 1}, ["target_logprob"]),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_names_any_iterable_of_names(names, fields, backend):
    z, y = torch.randn(4, 5), torch.tensor([0, 1, -100, 3])
    for call in (lambda s: xt.cross_entropy(z, y, backend=backend, statistics=s),
                 lambda s: xt.linear_cross_entropy(z, torch.randn(6, 5), y, backend=backend,
                                                   statistics=s)):
        _, stats = call(names)
        assert [f for f in ALL if getattr(stats, f) is not None] == fields
        assert stats.counted.tolist() == [True, True, False, True]
    # a one-shot iterator is read once
    _, stats = xt.cross_entropy(z, y, backend=backend, statistics=iter(["entropy", "lse"]))
    assert stats.lse is not None and stats.entropy is not None


@pytest.mark.parametrize("bad", ["LSE", "", "lse,entropy", ["lse", None], [["lse"]], 5, 3.0,
                                 True, b"lse", range(2), np.array("lse"), torch.tensor(1),
                                 torch.tensor([1, 2]), ["lse "], object(), ["loss"]])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_names_raise_input_error_naming_statistics(bad, backend):
    z, y = torch.randn(4, 5), torch.tensor([0, 1, -100, 3])
    with pytest.raises(InputError, match="statistics"):
        xt.cross_entropy(z, y, backend=backend, statistics=bad)
    with pytest.raises(InputError, match="statistics"):
        xt.linear_cross_entropy(z, torch.randn(6, 5), y, backend=backend, statistics=bad)


# ---- the linear head


@pytest.mark.native_dispatch
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend,chunk", [("native", None), ("auto", None), ("rowblock", None),
                                           ("rowblock", 1), ("rowblock", 3), ("auto", 7),
                                           ("rowblock", 40)])
def test_linear_head_ragged_chunks_options_and_ignored_rows(dtype, backend, chunk):
    g = torch.Generator().manual_seed(6)
    n, d, c = 37, 6, 9
    x = torch.randn(n, d, generator=g).to(dtype)
    w = torch.randn(c, d, generator=g).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[[1, 4, 5, 9, 30]] = 2
    logits = (x.double() @ w.double().T + b.double())
    tol = 1e-5 if dtype != torch.bfloat16 else 3e-2
    cw = torch.rand(c, generator=g).to(dtype)
    for kw in ({}, {"z_loss": 0.05, "softcap": 3.0}, {"label_smoothing": 0.2, "weight": cw}):
        if backend == "native" and "z_loss" in kw:
            continue
        for reduction in ("mean", "none"):
            xr = x.clone().requires_grad_()
            loss, stats = xt.linear_cross_entropy(xr, w, y, b, backend=backend, chunk_size=chunk,
                                                  ignore_index=2, reduction=reduction,
                                                  statistics=ALL, **kw)
            loss.sum().backward()
            want, counted = reference(logits, y, ignore_index=2, softcap=kw.get("softcap"),
                                      z_loss=kw.get("z_loss", 0.0))
            if dtype == torch.bfloat16:  # a bf16 matmul: ties of accuracy may move
                want.pop("accuracy")
                stats = stats._replace(accuracy=None)
            check(stats, want, counted, dtype, tol=tol)


@pytest.mark.native_dispatch
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_head_shift_k_dimensional_unbatched_and_probability(backend):
    g = torch.Generator().manual_seed(7)
    bsz, t_len, d, c = 2, 6, 4, 7
    h = torch.randn(bsz, t_len, d, generator=g)
    w = torch.randn(c, d, generator=g)
    tok = torch.randint(0, c, (bsz, t_len), generator=g)
    tok[0, 2] = -100
    for leak in (False, True):  # non-finite last features: torch's own slicing inside
        hh = h.clone()
        if leak:
            hh[1, -1, 0] = INF
        _, stats = xt.linear_cross_entropy(hh.requires_grad_(), w, tok, shift=True,
                                           backend=backend, statistics=ALL, reduction="none")
        want, counted = reference((hh[:, :-1].detach().double() @ w.double().T).reshape(-1, c),
                                  tok[:, 1:].reshape(-1))
        check(stats, want, counted, shape=(bsz, t_len - 1))
    _, stats = xt.linear_cross_entropy(h[0], w, tok[0], shift=True, backend=backend,
                                       statistics=ALL)
    check(stats, *reference(h[0, :-1].double() @ w.double().T, tok[0, 1:]), shape=(t_len - 1,))
    # K-dimensional head (C, d1, D)
    x = torch.randn(3, d, generator=g)
    wk, bk = torch.randn(c, 2, d, generator=g), torch.randn(c, 2, generator=g)
    yk = torch.randint(0, c, (3, 2), generator=g)
    yk[0, 1] = -100
    _, stats = xt.linear_cross_entropy(x, wk, yk, bk, backend=backend, statistics=ALL)
    lk = torch.einsum("nd,cjd->njc", x.double(), wk.double()) + bk.double().T
    check(stats, *reference(lk.reshape(-1, c), yk.reshape(-1)), shape=(3, 2))
    # unbatched (D,), index and probability targets
    _, stats = xt.linear_cross_entropy(x[0], w, torch.tensor(3), backend=backend, statistics=ALL)
    check(stats, *reference((x[0].double() @ w.double().T)[None], torch.tensor([3])), shape=())
    tp = torch.softmax(torch.randn(c, generator=g), 0)
    _, stats = xt.linear_cross_entropy(x[0], w, tp, backend=backend, statistics=PROB)
    check(stats, *reference((x[0].double() @ w.double().T)[None]), shape=())
    # probability targets (N, C), several chunks
    tps = torch.softmax(torch.randn(11, c, generator=g), 1)
    xs = torch.randn(11, d, generator=g)
    kw = {} if backend == "native" else {"chunk_size": 4, "z_loss": 0.1}
    _, stats = xt.linear_cross_entropy(xs, w, tps, backend=backend, statistics=PROB, **kw)
    check(stats, *reference(xs.double() @ w.double().T, z_loss=kw.get("z_loss", 0.0)))
    with pytest.raises(UnsupportedError, match="statistics"):
        xt.linear_cross_entropy(xs, w, tps, backend=backend, statistics="accuracy")


@pytest.mark.parametrize("backend,chunk", [("native", None), ("rowblock", None),
                                           ("rowblock", 2)])
def test_linear_head_all_ignored_and_empty(backend, chunk):
    x, w = torch.randn(5, 3), torch.randn(4, 3)
    for grad in (False, True):
        loss, stats = xt.linear_cross_entropy(x.clone().requires_grad_(grad), w,
                                              torch.full((5,), -100), backend=backend,
                                              chunk_size=chunk, statistics=ALL)
        assert loss.isnan() and not stats.counted.any() and not stats.accuracy.any()
        assert stats.lse.isnan().all() and stats.entropy.isnan().all()
    _, stats = xt.linear_cross_entropy(torch.randn(0, 3), w, torch.zeros(0, dtype=torch.long),
                                       backend=backend, chunk_size=chunk, statistics=ALL)
    assert all(t.shape == (0,) for t in stats)


# ---- modules and threads


def test_modules_pass_statistics_through():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(9, 5, generator=g)
    y = torch.tensor([0, 1, -100, 3, 4, 2, 1, 0, -100])
    _, stats = xt.CrossEntropyLoss(z_loss=0.1)(z, y, statistics=ALL)
    check(stats, *reference(z, y, z_loss=0.1))
    head = xt.LinearCrossEntropyLoss(5, 6, bias=True, chunk_size=4)
    with torch.no_grad():
        logits = head.linear(z).double()
    _, stats = head(z, y, statistics=("entropy", "accuracy"))
    check(stats, pick(reference(logits, y)[0], ("entropy", "accuracy")), y != -100)
    assert isinstance(head(z, y), torch.Tensor)


def test_two_threads_compute_statistics_at_once(workers):
    g = torch.Generator().manual_seed(9)
    jobs = []
    for k in range(4):
        z = (k + 1) * torch.randn(50, 17, generator=g)
        y = torch.randint(0, 17, (50,), generator=g)
        y[::7] = -100
        z[5, 3], z[8], z[11, 2] = INF, -INF, NAN
        x, w = torch.randn(23, 5, generator=g), torch.randn(17, 5, generator=g)
        jobs.append((z, y, x, w, y[:23]))
    errors = []

    def run(k):
        z, y, x, w, yl = jobs[k]
        try:
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                zz = z.to(dtype).requires_grad_()
                loss, stats = xt.cross_entropy(zz, y, backend="rowblock", statistics=ALL)
                loss.backward()
                check(stats, *reference(z.to(dtype), y), dtype)
                _, stats = xt.linear_cross_entropy(x.requires_grad_(), w, yl, chunk_size=5,
                                                   backend="rowblock", statistics=ALL)
                check(stats, *reference(x.detach().double() @ w.double().T, yl))
        except Exception as e:  # reported in the main thread
            errors.append((k, repr(e)))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
