"""Triton kernels for ``crossent.torch`` on GPUs: the fused cross-entropy and the linear head.

Nothing here is imported by ``import crossent.torch``; importing this package does not
import triton either (the kernels are decorated on first launch, see :mod:`.kernels`), so
it imports, and its doctests run, where triton is missing. On CPU tensors the kernels run
in triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported); that is
how ``tests/triton`` checks them without a GPU.

API (what a kernel seam calls)
------------------------------
``cross_entropy_forward(logits2d, target, *, weight=None, ignore_index=-100,
label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean", compute_grad=True,
grad_out=None, row_multiplier=None, scale=None, block=None, defer_mean=False)
-> CrossEntropyRows``
    One launch (one program per row, or a persistent grid: ``ops.ce_launch_config``):
    ``(loss, lse, grad, denominator, deferred)``; ``loss``/``lse``
    are ``(N,)`` float32 (float64 for float64 logits), ``grad`` is ``grad_out`` or, with
    ``grad_out=None``, the logits themselves (overwritten), holding
    ``d(reduced loss)/d(logits)`` (``"mean"``: divided by ``denominator``; times
    ``row_multiplier[n]``; ``scale`` (0-d device tensor) replaces the reduction's own
    factor; ``defer_mean``: but for its power of two, returned as ``deferred``, else
    None). No host synchronisation; no option checks (the caller's rules do them).
``denominator(target, V, weight, ignore_index, dtype)``, ``reduce_rows(loss, denom,
reduction)``
    torch's "mean" denominator as a device tensor, and the reduction.
``scale_(x, factor, per_row=False)``
    ``x *= factor`` in place on the device (one value, or one per row: the
    ``grad_output`` of ``reduction="none"``); nothing is read or written where the factor
    is exactly 1, so ``loss.backward()`` costs no pass over the gradient and no sync.
``triton_cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
label_smoothing=0.0, *, z_loss=0.0, softcap=None, inplace_backward=False,
check_targets=True, block=None)``
    ``torch.nn.functional.cross_entropy`` semantics (``(C)``, ``(N, C)``,
    ``(N, C, d1, ...)``, index or probability targets, weights, ignore_index, smoothing,
    reductions) plus crossent's ``z_loss`` and ``softcap``, as an autograd Function:
    the gradient is computed in forward and scaled by ``grad_output`` in backward;
    backward twice raises (float64 keeps the gradient so gradcheck works); a double
    backward (``create_graph=True``) recomputes from the saved input with the CPU path's
    differentiable formulas (:mod:`crossent.torch._composite`; refused with
    ``inplace_backward``); no gradient for ``target`` or ``weight``
    (``UnsupportedError``). As torch: ``weight`` in the input's dtype (or float32 for
    bf16/fp16 input, as under autocast), a non-negative
    ``ignore_index`` refused with probability targets (``InputError``). Class indices of
    any integer dtype (the CPU kernel's rule), compared in int64 (``-100`` is never cast
    to ``uint8``'s 156). ``check_targets`` raises torch's ``IndexError`` for an
    out-of-range class index (one host sync; without it the row's loss is NaN).
``triton_linear_cross_entropy(input, linear_weight, target, linear_bias=None, *,
weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
softcap=None, chunk_size=None, skip_ignored=True, check_targets=True, block=None)``
    ``cross_entropy(input @ W.T + b, target, ...)`` through row chunks: cuBLAS matmul,
    the kernel in place on the chunk's logits (gradient rounded once to the matmul dtype),
    ``dx = G W``, ``dW += G^T x`` and ``db += sum G`` in float32 (CUDA: straight from the
    matmul with a float32 output; elsewhere per vocabulary tile, each partial product
    rounded once). bfloat16 (float16 on GPUs) multiplies in its own dtype, as the
    unfused head does; input, weight and bias of one dtype (``F.linear`` raises for a
    mix, so does this). Ignored rows are skipped by the matmuls (``skip_ignored``), by the
    rule both linear heads share (:func:`crossent.torch._chunked_head.split_rows`): not
    where an ignored row's logits may not be finite (a non-finite feature, weight or
    bias, or finite ones whose product may overflow, by a cheap bound: torch's NaN then
    reaches dx and dW); three host syncs per call. Double backward as above. ``"mean"``/``"sum"``:
    gradients in forward; ``"none"``: the backward recomputes the chunks with each row scaled by its
    ``grad_output``. Default chunk: logits of a quarter of the float32 dW's bytes
    (2048 rows at V=128256, D=4096, bf16).

Semantics (same contract as the CPU kernel, :mod:`crossent.torch._rowblock`)
-------------------------------------------------------------------------
Row loss, index target ``y``, smoothing ``eps``, class weights ``w`` (1 if none), ``V``
classes, ``z`` the logits after ``softcap`` (``c tanh(z / c)``):
``(1 - eps) w_y (lse - z_y) + (eps / V) sum_c w_c (lse - z_c) + z_loss lse^2``; probability
target ``t``: ``sum_c T_c (lse - z_c) + z_loss lse^2`` with ``T = ((1 - eps) t + eps / V) w``
(a zero ``T_c`` contributes exactly 0). "mean" divides by ``sum_n w[y_n]`` over non-ignored
rows (index targets) or by ``N`` (probabilities); z-loss is not class-weighted but shares
that denominator; a zero denominator gives NaN (torch: 0/0). Ignored rows: loss 0,
gradient torch's: 0, or NaN throughout where the row's max is not finite (a NaN, a +inf,
every logit -inf; torch's log_softmax backward forms ``0 x exp(NaN)``).
Differences from torch, on purpose: a zero target probability contributes exactly 0
where its logit is -inf (torch: 0 * inf = NaN; pitfall 4), and loss terms are summed as
``T_c ((m - z_c) + log s)`` in float32, so logits near 3e38 give torch's float64 values
where torch's float32 overflows. Gradient
``r (A p - B) * (1 - tanh^2(z / c))`` as in :mod:`.kernels`. float32 arithmetic (float64
for float64 input), gradient rounded once into the input dtype (on GPUs to nearest; the
CPU interpreter truncates float32 to bfloat16, so its bf16 results may sit one ulp toward
zero).

Fused matmul + log-sum-exp (no ``N x V`` chunk): experimental, :mod:`.fused_linear`
-----------------------------------------------------------------------------------
Cut Cross-Entropy's approach (Wijmans et al. 2024, arXiv:2411.09009): logits never leave
registers. ``fused_linear_cross_entropy(x, W, target, b, *, weight, reduction,
ignore_index, z_loss)`` computes blocks of ``x W^T`` with Triton's ``tl.dot`` and folds
them into a per-row (max, sum-exp) over vocabulary splits (forward), then recomputes each
block in backward to form ``G`` and adds ``G W`` / ``G^T x`` / ``sum G`` into float32
dx / dW / db with atomics. No chunk buffer (the chunked head's is ``2048 x 128256`` bf16 =
525 MB at the benchmark's head), but ``x W^T`` is computed twice (forward and backward)
plus the two gradient products, with untuned Triton matmuls instead of cuBLAS, and the
atomics add every block's products into dx and dW. Index targets, class weights,
``ignore_index``, ``z_loss`` and all reductions only (smoothing, softcap, probability
targets raise ``UnsupportedError``). Which head is faster at which memory is measured by
``benchmarks/gpu/bench_cuda.py`` (contenders ``crossent-triton``, ``crossent-fused``,
``cce``); until a GPU run says otherwise the chunked head is the one to wire in.
"""

from __future__ import annotations

from .autograd import triton_cross_entropy, triton_linear_cross_entropy
from .ops import CrossEntropyRows, cross_entropy_forward, denominator, reduce_rows, scale_

__all__ = [
    "CrossEntropyRows",
    "available",
    "cross_entropy_forward",
    "denominator",
    "reduce_rows",
    "scale_",
    "triton_cross_entropy",
    "triton_linear_cross_entropy",
]


def available() -> bool:
    """Whether triton can be imported (the kernels need it on every device).

    >>> isinstance(available(), bool)
    True
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
