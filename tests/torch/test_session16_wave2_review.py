"""Adversarial review of session 16's second wave of fixes (helper H40): ``shift=True``
falling back to torch's own ``x[..., :-1, :]`` / ``target[..., 1:]`` slicing where the
ignored padding rows would leak into a gradient (non-finite last positions, label
smoothing with a non-finite class weight, a ``torch.func`` transform), the row-block
kernel's zero-scale rows (``0 x w_y``) and its softcap derivative as a factor, the lazy
``idle_nan`` question of ``split_rows``, ``global_num_items``' checks, ``check_num_items``
under transforms, ``check_index_dtype`` first in ``_flatten``, and the vocab-parallel
refusal for class weights whose sum is not finite.

References: ``torch.nn.functional`` in float64 (NaN-exact: ``grad_probes``). The five
differences it found (shift on meta tensors, finite weights whose sum overflows in the
row-block kernel and in float32 vocab-parallel, a num_items tangent dropped, a
non-iterable global_num_items target) are fixed; each test failed before its fix."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from grad_probes import assert_same_with_nans as same

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch import _chunked_head, _linear
from crossent.torch.distributed import global_num_items, vocab_parallel_cross_entropy

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from dist_harness import run_group

pytestmark = pytest.mark.timeout(120)

F64 = torch.float64
INF, NAN = math.inf, math.nan
B, T, D, C = 2, 4, 3, 5


def gen(seed):
    return torch.Generator().manual_seed(seed)


def head(seed, dtype=F64):
    g = gen(seed)
    x = torch.randn(B, T, D, generator=g, dtype=F64)
    w = torch.randn(C, D, generator=g, dtype=F64)
    b = torch.randn(C, generator=g, dtype=F64)
    y = torch.randint(0, C, (B, T), generator=g)
    y[0, 1] = -100
    return x.to(dtype), w.to(dtype), b.to(dtype), y


def grads(fn, leaves, grad_output=None):
    """``fn`` of fresh leaf copies, and the gradients of ``sum(out * grad_output)``."""
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*copies)
    go = torch.ones_like(out) if grad_output is None else grad_output
    return (out.detach(), *torch.autograd.grad(out, copies, go))


def torch_shifted(x, w, b, y, reduction="mean", num_items=None, **kw):
    """torch's causal-LM loss on the sliced views (float64)."""
    kept = y[..., 1:]
    out = F.cross_entropy(F.linear(x[..., :-1, :], w, b).reshape(-1, C), kept.reshape(-1),
                          reduction="sum" if num_items is not None else reduction, **kw)
    if num_items is not None:
        return out / num_items
    return out.reshape(kept.shape) if reduction == "none" else out


def leaky(case, seed):
    """Head data where shift=True's padding rows would reach a gradient."""
    x, w, b, y = head(seed)
    kw = {}
    if case == "inf_last":
        x[0, -1, 1] = INF
    elif case == "nan_last":
        x[-1, -1, 0] = NAN
    elif case == "smooth_inf_weight":
        kw = dict(weight=torch.tensor([0.5, 1.0, INF, 2.0, 1.5], dtype=F64),
                  label_smoothing=0.1)
    elif case == "smooth_nan_weight":
        kw = dict(weight=torch.tensor([0.5, 1.0, NAN, 2.0, 1.5], dtype=F64),
                  label_smoothing=0.2)
    return x, w, b, y, kw


# ---- 1. shift=True: torch's own slicing where the padding would leak


@pytest.mark.parametrize("case", ["inf_last", "nan_last", "smooth_inf_weight",
                                  "smooth_nan_weight"])
@pytest.mark.parametrize("backend", ["auto", "native", "rowblock"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "num_items"])
@pytest.mark.parametrize("batched", [True, False])
def test_shift_leaky_padding_matches_torchs_slicing(case, backend, reduction, batched):
    x, w, b, y, kw = leaky(case, 0)
    if not batched:  # (T, D) hidden states, (T,) targets; the non-finite row is row 0's
        x, y = x[0] if case != "nan_last" else x[-1], y[0]
    red = dict(num_items=7) if reduction == "num_items" else dict(reduction=reduction)
    want = grads(lambda a, c, d: torch_shifted(a, c, d, y, **red, **kw), [x, w, b])
    got = grads(lambda a, c, d: xt.linear_cross_entropy(a, c, y, d, shift=True,
                                                        backend=backend, **red, **kw),
                [x, w, b])
    for a, r in zip(got, want, strict=True):
        same(a, r)


@pytest.mark.parametrize("backend", ["auto", "rowblock", "native"])
@pytest.mark.parametrize("case", ["inf_last", "smooth_inf_weight"])
def test_shift_leaky_padding_statistics_have_the_sliced_shape(backend, case):
    x, w, b, y, kw = leaky(case, 1)
    zl = 0.0 if backend == "native" else 0.01
    names = ("lse", "z_loss", "target_logprob", "accuracy", "entropy")
    out, st = xt.linear_cross_entropy(x, w, y, b, shift=True, reduction="none",
                                      statistics=names, backend=backend, z_loss=zl, **kw)
    logits, kept = F.linear(x[:, :-1], w, b), y[:, 1:]
    counted = kept != -100
    lse, logp = torch.logsumexp(logits, -1), torch.log_softmax(logits, -1)
    nan = torch.tensor(NAN, dtype=F64)

    def masked(v):
        return torch.where(counted, v, nan)

    assert torch.equal(st.counted, counted)
    same(st.lse, masked(lse))
    same(st.z_loss, masked(zl * lse.square()))
    same(st.target_logprob, masked(logp.gather(-1, kept.clamp(min=0)[..., None])[..., 0]))
    same(st.entropy, masked(-(logp.exp() * logp).sum(-1)))
    assert torch.equal(st.accuracy, (logits.argmax(-1) == kept) & counted)
    want = torch_shifted(x, w, b, y, reduction="none", **kw)
    same(out, want + torch.where(counted, zl * lse.square(), 0.0))


def test_shift_under_vmap_grad_and_jvp_matches_torch():
    from torch.func import grad, jvp, vmap

    x, w, b, y = head(2)
    xs = torch.randn(3, B, T, D, generator=gen(3), dtype=F64)
    xs[1, 0, -1, 2] = INF  # one vmapped sample's last position

    def ours(a, c, d):
        return xt.linear_cross_entropy(a, c, y, d, shift=True)

    def ref(a, c, d):
        return torch_shifted(a, c, d, y)

    for arg in (0, 1, 2):
        same(vmap(grad(ours, argnums=arg), in_dims=(0, None, None))(xs, w, b),
             vmap(grad(ref, argnums=arg), in_dims=(0, None, None))(xs, w, b))
    tangent = torch.randn_like(x)
    for a, r in zip(jvp(lambda a: ours(a, w, b), (x,), (tangent,)),
                    jvp(lambda a: ref(a, w, b), (x,), (tangent,)), strict=True):
        same(a, r)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shift_leaky_padding_under_compile_fullgraph(reduction):
    x, w, b, y, _ = leaky("inf_last", 4)
    fn = torch.compile(lambda a, c, d: xt.linear_cross_entropy(
        a, c, y, d, shift=True, reduction=reduction), backend="eager", fullgraph=True)
    got = grads(fn, [x, w, b])
    want = grads(lambda a, c, d: torch_shifted(a, c, d, y, reduction=reduction), [x, w, b])
    for a, r in zip(got, want, strict=True):
        same(a, r)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shift_one_position_with_a_nonfinite_last_position(reduction):
    # T = 1: torch's sliced views are empty; "mean" over nothing is NaN, grads 0
    x, w, b, y = head(5)
    x, y = x[:, :1].clone(), y[:, :1]
    x[0, 0, 0] = INF
    want = grads(lambda a, c, d: torch_shifted(a, c, d, y, reduction=reduction), [x, w, b])
    got = grads(lambda a, c, d: xt.linear_cross_entropy(a, c, y, d, shift=True,
                                                        reduction=reduction), [x, w, b])
    for a, r in zip(got, want, strict=True):
        same(a, r)


def test_shift_finite_case_keeps_the_padding_route(monkeypatch):
    # the fallback is taken only where it must be: finite features, no smoothing
    x, w, b, y = head(6)
    seen = []
    real = _linear._padding_would_leak
    monkeypatch.setattr(_linear, "_padding_would_leak",
                        lambda *a: seen.append(real(*a)) or seen[-1])
    got = grads(lambda a, c, d: xt.linear_cross_entropy(a, c, y, d, shift=True), [x, w, b])
    assert seen == [False]
    for a, r in zip(got, grads(lambda a, c, d: torch_shifted(a, c, d, y), [x, w, b]),
                    strict=True):
        same(a, r)


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1}])
def test_shift_on_meta_tensors_propagates_shapes(kw):
    x, w, b, y = (t.to("meta") for t in head(18))
    if kw:
        kw = dict(kw, weight=torch.ones(C, dtype=F64, device="meta"))
    assert xt.linear_cross_entropy(x, w, y, b, shift=True, **kw).shape == ()
    out = xt.linear_cross_entropy(x, w, y, b, shift=True, reduction="none", **kw)
    assert out.shape == (B, T - 1) and out.device.type == "meta"
    assert xt.linear_cross_entropy(x[0], w, y[0], b, shift=True, reduction="none",
                                   **kw).shape == (T - 1,)


# ---- 2. the row-block kernel: zero-scale rows, softcap as a factor


def ref_ce(z, y, w, reduction, eps, cap, go):
    zd = z.detach().double().requires_grad_()
    zc = cap * torch.tanh(zd / cap) if cap else zd
    out = F.cross_entropy(zc, y, None if w is None else w.double(), reduction=reduction,
                          label_smoothing=eps)
    out.backward(torch.ones_like(out) if go is None else go.double())
    return out.detach(), zd.grad


def nan_pattern(got, want):
    got, want = got.detach().double(), want.detach().double()
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    assert torch.equal(got.isinf(), want.isinf()), (got, want)
    assert torch.equal(got.isinf() & (got > 0), want.isinf() & (want > 0)), (got, want)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight", ["inf_target", "nan_target", "inf_unused"])
@pytest.mark.parametrize("eps,cap", [(0.0, None), (0.1, None), (0.0, 3.0), (0.1, 3.0)])
def test_rowblock_zero_scale_rows_and_softcap_nan_exact(dtype, weight, eps, cap):
    for inplace in (False, True):
        _zero_scale_rows_case(dtype, weight, eps, cap, inplace)


def _zero_scale_rows_case(dtype, weight, eps, cap, inplace):
    g = gen(7)
    z = (torch.randn(6, C, generator=g) * 3).to(dtype)
    y = torch.tensor([2, -100, 0, 2, 1, 3])
    w = (torch.rand(C, generator=g) + 0.5).to(dtype)
    if weight == "inf_target":
        w[2] = INF
    elif weight == "nan_target":
        w[2] = NAN
    else:
        w[4] = INF
    go = torch.tensor([0.0, 1.0, 1.0, 2.0, 0.0, NAN], dtype=dtype)  # zero rows, a NaN row
    want = ref_ce(z, y, w, "none", eps, cap, go)
    leaf = z.clone().requires_grad_()
    out = xt.cross_entropy(leaf * 1.0 if inplace else leaf, y, w, reduction="none",
                           label_smoothing=eps, softcap=cap, inplace_backward=inplace,
                           backend="rowblock")
    (dz,) = torch.autograd.grad(out, leaf, go)
    for a, r in zip((out, dz), want, strict=True):
        if dtype == F64:
            same(a, r)
        else:
            nan_pattern(a, r)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_rowblock_infinite_weight_mean_and_sum_with_softcap(reduction, eps):
    z = torch.randn(5, C, generator=gen(8), dtype=F64) * 4
    y = torch.tensor([0, 1, -100, 3, 1])
    w = torch.tensor([1.0, INF, 1.0, 2.0, 0.5], dtype=F64)
    want = ref_ce(z, y, w, reduction, eps, 2.0, None)
    got = grads(lambda t: xt.cross_entropy(t, y, w, reduction=reduction, label_smoothing=eps,
                                           softcap=2.0, backend="rowblock"), [z])
    same(got[0], want[0])
    same(got[1], want[1])


def test_rowblock_softcap_statistics_unchanged_by_the_tanh_buffer():
    # the derivative squares the tanh buffer in place: statistics, the loss and a second
    # block (block=2 rows) must still see the capped logits
    z = torch.randn(7, C, generator=gen(9), dtype=F64) * 5
    y = torch.tensor([0, 1, -100, 3, 1, 4, 2])
    names = ("lse", "z_loss", "target_logprob", "accuracy", "entropy")
    leaf = z.clone().requires_grad_()
    out, st = xt.cross_entropy(leaf, y, reduction="none", softcap=2.5, z_loss=0.01,
                               statistics=names, backend="rowblock")
    (dz,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
    zd = z.clone().requires_grad_()
    zc = 2.5 * torch.tanh(zd / 2.5)
    lse, logp = torch.logsumexp(zc, 1), torch.log_softmax(zc, 1)
    counted = y != -100
    ref = F.cross_entropy(zc, y, reduction="none") + torch.where(counted,
                                                                 0.01 * lse.square(), 0.0)
    (rdz,) = torch.autograd.grad(ref, zd, torch.ones_like(ref))
    same(out, ref)
    same(dz, rdz)
    nan = torch.tensor(NAN, dtype=F64)
    same(st.lse, torch.where(counted, lse, nan).detach())
    same(st.entropy, torch.where(counted, -(logp.exp() * logp).sum(1), nan).detach())


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_linear_head_softcap_smoothing_infinite_weight_ignored_rows(chunk_size, dtype):
    g = gen(10)
    x = torch.randn(7, D, generator=g).to(dtype)
    lw = torch.randn(C, D, generator=g).to(dtype)
    b = torch.randn(C, generator=g).to(dtype)
    y = torch.tensor([0, -100, 1, 3, -100, 4, 1])
    w = torch.tensor([1.0, 2.0, INF, 1.0, 0.5]).to(dtype)
    kw = dict(weight=w, label_smoothing=0.1, reduction="sum")

    def ref(a, c, d):
        z = F.linear(a.double(), c.double(), d.double())
        return F.cross_entropy(2.0 * torch.tanh(z / 2.0), y, w.double(), label_smoothing=0.1,
                               reduction="sum")

    want = grads(ref, [x, lw, b])
    got = grads(lambda a, c, d: xt.linear_cross_entropy(
        a, c, y, d, softcap=2.0, chunk_size=chunk_size, backend="rowblock", **kw),
        [x, lw, b])
    for a, r in zip(got, want, strict=True):
        (same if dtype == F64 else nan_pattern)(a, r)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_rowblock_smoothing_finite_weights_whose_sum_overflows(dtype):
    big = torch.finfo(dtype).max / 2
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, 1.0, 2.0]], dtype=dtype)
    y = torch.tensor([1, 2])
    w = torch.full((3,), big, dtype=dtype)
    leaf, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    F.cross_entropy(ref, y, w, reduction="sum", label_smoothing=0.1).backward()
    assert ref.grad.isfinite().all()
    xt.cross_entropy(leaf, y, w, reduction="sum", label_smoothing=0.1,
                     backend="rowblock").backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=0.0)


# ---- 3. split_rows asks idle_nan lazily


@pytest.mark.parametrize("ignored", [False, True])
def test_split_rows_asks_idle_nan_only_with_an_ignored_row(ignored):
    x = torch.randn(4, D, dtype=F64)
    counted = torch.tensor([True, not ignored, True, True])
    asked = []
    split = _chunked_head.split_rows(counted, x, lambda: asked.append(1) or True)
    assert asked == ([1] if ignored else [])
    assert split is None  # idle_nan True (or nothing ignored): no split
    kept = _chunked_head.split_rows(counted, x, lambda: False)
    assert (kept is None) == (not ignored)  # idle_nan False: the split as without it
    if ignored:
        plain = _chunked_head.split_rows(counted, x)
        assert plain is not None
        for a, b in zip(kept, plain, strict=True):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_linear_head_without_ignored_rows_never_reads_the_weight(monkeypatch):
    asked = []
    monkeypatch.setattr(_linear, "idle_rows_nan", lambda *a: asked.append(a) or False)
    x, w, b, y = head(11)
    y = y.clamp(min=0)
    cw = torch.rand(C, dtype=F64) + 0.5
    xt.linear_cross_entropy(x.reshape(-1, D).requires_grad_(), w, y.reshape(-1), b,
                            weight=cw, label_smoothing=0.1, backend="rowblock").backward()
    assert asked == []


# ---- 5. global_num_items


def test_global_num_items_counts_narrow_unsigned_ids_as_classes():
    # 156 (uint8) and 65436 (uint16) are -100 wrapped: classes, which the losses count
    assert int(global_num_items(torch.tensor([156, 1, 2], dtype=torch.uint8))) == 3
    assert int(global_num_items(torch.tensor([65436, 7], dtype=torch.uint16))) == 2
    assert int(global_num_items([torch.tensor([-100, 3], dtype=torch.int8),
                                 torch.tensor([0, 1], dtype=torch.uint8)])) == 3
    z = torch.randn(3, 200, generator=gen(12), dtype=F64)
    y = torch.tensor([156, 1, 2], dtype=torch.uint8)
    same(xt.cross_entropy(z, y, reduction="sum"), F.cross_entropy(z, y.long(), reduction="sum"))


@pytest.mark.parametrize("bad", ["uint64_big", "float", "bool", "float_ignore", "empty"])
def test_global_num_items_bad_arguments_named(bad):
    args = {"uint64_big": (torch.tensor([2**63 + 5], dtype=torch.uint64),),
            "float": (torch.tensor([1.0]),), "bool": (torch.tensor([True]),),
            "float_ignore": (torch.tensor([1]), 1.5), "empty": ([],)}[bad]
    with pytest.raises(InputError, match="ignore_index" if "ignore" in bad else "target"):
        global_num_items(*args)


@pytest.mark.parametrize("bad", [None, 5])
def test_global_num_items_non_iterable_target_is_an_input_error(bad):
    with pytest.raises(InputError, match="target"):
        global_num_items(bad)


def _one_rank_bad(rank, world, bad):
    target = torch.tensor([1, -100, 2])
    if rank == 1:
        target = {"float": torch.tensor([1.0])}[bad]
    try:
        global_num_items(target)
    except InputError as error:
        assert ("another rank" in str(error)) == (rank != 1), str(error)
    else:
        raise AssertionError(f"rank {rank} did not raise")


def test_global_num_items_bad_float_target_on_one_rank_raises_on_both():
    run_group(_one_rank_bad, 2, "float", timeout=60)


# ---- 6. check_num_items under transforms


def test_num_items_vmapped_count_refused_meta_count_named():
    from torch.func import grad, vmap

    z = torch.randn(3, 4, C, generator=gen(13))
    y = torch.randint(0, C, (3, 4), generator=gen(14))
    n = torch.tensor([2.0, 3.0, 4.0])
    with pytest.raises(UnsupportedError, match="num_items"):
        vmap(lambda a, b, c: xt.cross_entropy(a, b, reduction="sum", num_items=c))(z, y, n)
    lw = torch.randn(C, 4)
    with pytest.raises(UnsupportedError, match="num_items"):
        vmap(lambda a, c: xt.linear_cross_entropy(a, lw, y[0, :3], reduction="sum",
                                                  num_items=c))(torch.randn(3, 3, 4), n)
    with pytest.raises(UnsupportedError, match="num_items"):  # a grad wrapper around it
        vmap(grad(lambda a, c: xt.cross_entropy(a, y[0], reduction="sum", num_items=c)))(
            z, n)
    with pytest.raises(InputError, match="num_items"):
        xt.cross_entropy(z[0], y[0], reduction="sum",
                         num_items=torch.tensor(2.0, device="meta"))
    # vmapped over the logits only: the count is one constant, torch's sum / n
    got = vmap(lambda a: xt.cross_entropy(a, y[0], reduction="sum",
                                          num_items=torch.tensor(3.0)))(z.double())
    same(got, torch.stack([F.cross_entropy(a, y[0], reduction="sum") / 3.0
                           for a in z.double()]))


@pytest.mark.parametrize("how", ["jvp", "forward_ad"])
def test_num_items_forward_ad_tangent_not_dropped(how):
    import torch.autograd.forward_ad as fwad
    from torch.func import jvp

    z = torch.randn(2, 3, generator=gen(15), dtype=F64)
    y = torch.tensor([0, 1])

    def ours(c):
        return xt.cross_entropy(z, y, reduction="sum", num_items=c)

    def ref(c):
        return F.cross_entropy(z, y, reduction="sum") / c

    n, dn = torch.tensor(2.0, dtype=F64), torch.tensor(1.0, dtype=F64)
    try:
        if how == "jvp":
            got, want = jvp(ours, (n,), (dn,))[1], jvp(ref, (n,), (dn,))[1]
        else:
            with fwad.dual_level():
                c = fwad.make_dual(n, dn)
                got = fwad.unpack_dual(ours(c)).tangent
                want = fwad.unpack_dual(ref(c)).tangent
    except UnsupportedError as error:  # refused loudly, naming num_items: fine
        assert "num_items" in str(error)
        return
    assert got is not None
    same(got, want)


# ---- 7. _flatten: the target's dtype named first


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_unusable_target_dtype_named_before_shape_rules(dtype):
    z = torch.randn(2, 3)
    bad = torch.zeros(5, dtype=dtype)  # also the wrong shape
    for fn in (lambda: xt.cross_entropy(z, bad),
               lambda: xt.cross_entropy(z.to("meta"), bad.to("meta"))):
        with pytest.raises(InputError, match=str(dtype)):
            fn()


def test_uint64_ids_past_int64_refused_everywhere_small_ones_work():
    z = torch.randn(2, 3, generator=gen(16), dtype=F64)
    big = torch.tensor([2**64 - 100, 1], dtype=torch.uint64)  # wraps to ignore_index -100
    for fn in (lambda t: xt.cross_entropy(z, t),
               lambda t: xt.CrossEntropyLoss()(z, t),
               lambda t: xt.linear_cross_entropy(z, torch.eye(3, dtype=F64), t),
               lambda t: vocab_parallel_cross_entropy(z, t)):
        with pytest.raises(InputError, match="uint64"):
            fn(big)
    small = torch.tensor([2, 1], dtype=torch.uint64)
    same(xt.cross_entropy(z, small), F.cross_entropy(z, small.long()))
    meta = xt.cross_entropy(z.to("meta"), small.to("meta"))  # no host read on meta
    assert meta.device.type == "meta" and meta.shape == ()


# ---- 8. vocab-parallel smoothing with a class-weight sum that is not finite


@pytest.mark.parametrize("weights", [[1.0, INF, 1.0], [1.0, NAN, 1.0],
                                     [1e308, 1e308, 1.0]])
def test_vocab_parallel_refuses_smoothing_with_a_nonfinite_weight_sum(weights):
    z = torch.randn(2, 3, generator=gen(17), dtype=F64)
    y = torch.tensor([0, 1])
    w = torch.tensor(weights, dtype=F64)
    with pytest.raises(UnsupportedError, match="label_smoothing"):
        vocab_parallel_cross_entropy(z, y, weight=w, label_smoothing=0.1)
    # without smoothing the weights are torch's
    same(vocab_parallel_cross_entropy(z, y, weight=w, reduction="none"),
         F.cross_entropy(z, y, w, reduction="none"))


def test_vocab_parallel_float32_weights_whose_float32_sum_overflows():
    big = torch.finfo(torch.float32).max / 2
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, 1.0, 2.0]])
    y = torch.tensor([1, 2])
    w = torch.full((3,), big)
    want = F.cross_entropy(z, y, w, label_smoothing=0.1, reduction="none")
    try:
        got = vocab_parallel_cross_entropy(z, y, weight=w, label_smoothing=0.1,
                                           reduction="none")
    except UnsupportedError as error:  # refused by name: fine
        assert "label_smoothing" in str(error)
        return
    nan_pattern(got, want)
