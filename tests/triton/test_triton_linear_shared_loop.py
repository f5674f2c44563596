"""The Triton linear head runs the chunk loop the CPU head runs
(:func:`crossent.torch._chunked_head.head_pass`): against torch's unfused
``F.cross_entropy(F.linear(x, W, b), y)`` in float64 (crossent's z-loss and softcap
written out in plain torch) for ignored rows (half, all, none), class weights, smoothing,
z-loss, softcap, every reduction, with and without bias, on ragged chunks; ignored rows
are skipped exactly as the CPU head skips them (dx exactly 0; not skipped where their
features are not finite, so NaN reaches dW as in torch); and the Triton and the CPU head
agree in float32. On CPU: triton's interpreter (see conftest.py), so 20 rows, D=8 and
150 classes (tiles of 64: two whole tiles and a ragged last one of 22)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from grad_probes import close_to_reference as close  # noqa: E402

import crossent.torch as xt  # noqa: E402
from crossent.torch._triton import ops, triton_linear_cross_entropy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter
# 150 classes in tiles of 64 (64 + 64 + a ragged 22): several tiles per row and a ragged
# last one, as the 300 classes (4 tiles + a ragged 44) this file had; at about half the
# interpreter's cost (the backward scales dW one program per class row)
N, D, V = 20, 8, 150
CHUNK = 7  # 20 rows: chunks of 7, 7, 6 (about 10 counted rows: 7, 3)
BLOCK = 64


def data(ignored="half", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / 2
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    if ignored == "half":
        y[torch.randperm(N, generator=g)[: N // 2]] = -100
        y[:2] = -100  # a masked prompt at the start
    elif ignored == "all":
        y[:] = -100
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    return x, w, b, y, cw


def torch_reference(x, w, y, b=None, *, weight=None, reduction="mean", label_smoothing=0.0,
                    z_loss=0.0, softcap=None):
    """The unfused head in plain torch: crossent's z-loss ``z_loss lse^2`` per counted row
    (sharing "mean"'s denominator) and ``softcap`` ``c tanh(z / c)`` written out."""
    z = F.linear(x, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    per = F.cross_entropy(z, y, weight, reduction="none", label_smoothing=label_smoothing)
    valid = y != -100
    if z_loss:
        per = per + torch.where(valid, z_loss * torch.logsumexp(z, 1) ** 2, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    w_y = valid.double() if weight is None else torch.where(valid, weight[y.clamp(min=0)], 0.0)
    return per.sum() / w_y.sum()  # 0/0 = NaN when every row is ignored, as torch


def run(fn, x, w, b, y, go, dtype=torch.float64, **kw):
    """Loss and gradients (x, W, b) of ``fn`` at leaves of ``dtype`` on the device."""
    leaves = [None if v is None else v.to(DEVICE, dtype).requires_grad_() for v in (x, w, b)]
    out = fn(leaves[0], leaves[1], y.to(DEVICE), leaves[2], **kw)
    out.backward(go.to(DEVICE, out.dtype))
    return out, [None if v is None else v.grad for v in leaves]


def grad_output(reduction, seed=1):
    g = torch.Generator().manual_seed(seed)
    if reduction == "none":
        return torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    return torch.tensor(0.7, dtype=torch.float64)


def triton_head(x, w, y, b, *, weight=None, **kw):
    return triton_linear_cross_entropy(
        x, w, y, b, weight=None if weight is None else weight.to(x.device, x.dtype),
        block=BLOCK, **kw)


def check_against_torch(ignored, reduction, bias, chunk=CHUNK, **kw):
    x, w, b, y, cw = data(ignored)
    b = b if bias else None
    kw = dict(kw, weight=cw.to(DEVICE)) if kw.pop("class_weight", False) else kw
    go = grad_output(reduction)
    want, want_grads = run(torch_reference, x, w, b, y, go, reduction=reduction, **kw)
    got, grads = run(triton_head, x, w, b, y, go, reduction=reduction, chunk_size=chunk,
                     **kw)
    close(got, want, 1e-10)
    for g, r in zip(grads, want_grads, strict=True):
        assert (g is None) == (r is None)
        if r is not None:
            assert g.dtype == torch.float64
            close(g, r, 1e-10)
    assert torch.all(grads[0][(y == -100).to(DEVICE)] == 0)  # exactly 0, not tiny


EVERYTHING = dict(class_weight=True, label_smoothing=0.1, z_loss=1e-2, softcap=3.0)


# each option alone (reductions and bias rotating: the interpreter is slow), then all
@pytest.mark.parametrize("option,reduction,bias", [
    (dict(), "mean", True),
    (dict(class_weight=True), "sum", True),
    (dict(label_smoothing=0.15), "none", False),
    (dict(z_loss=1e-2), "mean", False),
    (dict(softcap=2.5), "sum", True),
    (EVERYTHING, "mean", True),
    (EVERYTHING, "sum", False),
    (EVERYTHING, "none", True),
], ids=["plain", "class-weights", "smoothing", "z-loss", "softcap", "all-mean", "all-sum",
        "all-none"])
def test_half_ignored_every_option_is_torchs(option, reduction, bias):
    check_against_torch("half", reduction, bias, **option)


@pytest.mark.parametrize("reduction,bias", [("mean", True), ("sum", False), ("none", True)])
@pytest.mark.parametrize("ignored", ["none", "all"])
def test_no_rows_or_every_row_ignored_is_torchs(ignored, reduction, bias):
    check_against_torch(ignored, reduction, bias, class_weight=bias, label_smoothing=0.1,
                        z_loss=1e-3)


@pytest.mark.parametrize("chunk", [1, 64])
def test_chunk_sizes(chunk):
    """One row per chunk, chunks ragged against the counted rows, a single chunk."""
    check_against_torch("half", "mean", True, chunk=chunk, z_loss=1e-2, softcap=4.0)


def test_the_kernel_sees_only_counted_rows(monkeypatch):
    seen: list[int] = []
    real = ops.cross_entropy_forward

    def spy(logits, *args, **kwargs):
        seen.append(logits.shape[0])
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(ops, "cross_entropy_forward", spy)
    x, w, b, y, _ = data("half")
    counted = int((y != -100).sum())
    run(triton_head, x, w, b, y, grad_output("mean"), chunk_size=CHUNK)
    assert sum(seen) == counted < N and max(seen) == CHUNK
    seen.clear()  # reduction="none": the backward's recomputation skips them too
    run(triton_head, x, w, b, y, grad_output("none"), chunk_size=CHUNK, reduction="none")
    assert sum(seen) == 2 * counted
    seen.clear()  # skip_ignored=False: every row, the same numbers
    got, grads = run(triton_head, x, w, b, y, grad_output("mean"), chunk_size=CHUNK,
                     skip_ignored=False)
    assert sum(seen) == N
    want, want_grads = run(torch_reference, x, w, b, y, grad_output("mean"))
    close(got, want, 1e-10)
    for g, r in zip(grads, want_grads, strict=True):
        close(g, r, 1e-10)


def test_non_finite_features_of_an_ignored_row_reach_dw_as_in_torch():
    """torch's ``dW = G^T x`` turns an ignored row's zero gradient times NaN into NaN, and
    its softmax backward makes that row's logit gradient NaN: such a row is not skipped
    (the CPU head's rule), so the head gives torch's NaN in dx, dW and db."""
    x, w, b, y, _ = data("half")
    x[0] = torch.nan  # y[0] is ignored
    go = grad_output("mean")
    want, want_grads = run(torch_reference, x, w, b, y, go)
    got, grads = run(triton_head, x, w, b, y, go, chunk_size=CHUNK)
    close(got, want, 1e-10)
    assert grads[1].isnan().all() and want_grads[1].isnan().all()  # dW: NaN, as torch
    # the NaN row's own logit gradient is NaN, as torch's log_softmax backward makes it
    # (0 - exp(NaN) x 0): dx's row 0 and db are NaN too
    assert grads[0][0].isnan().all() and want_grads[0][0].isnan().all()
    close(grads[0][1:], want_grads[0][1:], 1e-10)
    assert torch.equal(grads[2].isnan(), want_grads[2].isnan()) and grads[2].isnan().all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpu_head_and_triton_head_agree_in_float32(reduction):
    x, w, b, y, cw = data("half", seed=2)
    kw = dict(weight=cw.float().to(DEVICE), label_smoothing=0.1, z_loss=1e-2, softcap=3.0,
              reduction=reduction, chunk_size=CHUNK)
    go = grad_output(reduction)
    cpu, cpu_grads = run(xt.linear_cross_entropy, x, w, b, y, go, torch.float32,
                         backend="rowblock", **kw)
    tri, tri_grads = run(triton_linear_cross_entropy, x, w, b, y, go, torch.float32,
                         block=BLOCK, **kw)
    assert tri.dtype == cpu.dtype == torch.float32
    close(tri, cpu, 2e-5)
    for g, r in zip(tri_grads, cpu_grads, strict=True):
        assert g.dtype == r.dtype == torch.float32
        close(g, r, 2e-5)
    ignored = (y == -100).to(DEVICE)
    assert torch.all(tri_grads[0][ignored] == 0) and torch.all(cpu_grads[0][ignored] == 0)
    want, _ = run(torch_reference, x, w, b, y, go, reduction=reduction, weight=cw.to(DEVICE),
                  label_smoothing=0.1, z_loss=1e-2, softcap=3.0)
    close(tri, want, 2e-5)
