"""The "same" cross-entropy as different libraries compute it, and why they differ.

For logits ``z (N, C)`` and class indices ``y (N)`` (``ignore_index`` rows not counted)
every convention below is one formula with three choices:

``loss = ((1 - s) A + s B) / D`` with
``A = sum_kept (lse_n - z_n,y_n)`` (the row losses, identical everywhere),
``B = sum_kept mean_{c in S} (lse_n - z_n,c)`` (the label-smoothing term),
and per convention the smoothing classes ``S``, the weight ``s`` and the denominator ``D``:

============  ==============================  ===================  ==============
convention    S (gets the smoothing mass)     s                    D
============  ==============================  ===================  ==============
torch         all ``C`` classes               ``eps``              kept rows
megatron      the rank's ``K = C / P``        ``eps K / (K - 1)``  kept rows
optax         all ``C`` classes               ``eps``              all ``N`` rows
keras         all ``C`` classes               ``eps``              all ``N`` rows
keras-sparse  (no label smoothing)            0                    kept rows
============  ==============================  ===================  ==============

Nothing kept (every row ignored): torch's and Megatron's mean is ``0 / 0 = NaN``; Keras'
``ignore_class`` mean divides with ``divide_no_nan`` and gives 0; optax and Keras' masked
mean divide by all ``N`` rows and give 0.

* torch: ``torch.nn.functional.cross_entropy(z, y, ignore_index=-100,
  label_smoothing=eps)``: the target keeps ``1 - eps + eps / C``, every class gets
  ``eps / C``; the mean divides by the rows whose target is not ignored.
* megatron: ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy(z, y,
  label_smoothing=eps)`` followed by the masked mean over the loss mask (``y != ignore``).
  Megatron spreads ``eps`` over the ``K - 1`` non-target classes (the target keeps exactly
  ``1 - eps``), written as ``s = eps K / (K - 1)`` on the mean over all ``K``; but ``K`` is
  the vocabulary of the tensor-parallel partition (``exp_logits.size(-1)``) and the mean of
  the log-probabilities runs over that partition only, so with ``P > 1`` ranks each rank's
  loss differs (``rank`` picks which one). With ``P = 1`` it equals torch's with
  ``label_smoothing = eps C / (C - 1)``.
* optax: ``optax.softmax_cross_entropy(z, optax.smooth_labels(one_hot(y), eps))`` per row
  (``softmax_cross_entropy_with_integer_labels`` for ``eps = 0``; optax has no
  ``ignore_index``: ignored rows are zeroed by a mask) then ``jnp.mean`` over every row, so
  padding rows count in the denominator.
* keras: ``keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=eps)``
  on one-hot targets with the padding masked by ``sample_weight``: its default reduction
  ``"sum_over_batch_size"`` divides by every row (Keras 3).
* keras-sparse: ``keras.losses.SparseCategoricalCrossentropy(from_logits=True,
  ignore_class=-100)``: no label smoothing, the mean over the rows not ignored (Keras 3).

Binary label smoothing (Keras' ``BinaryCrossentropy(label_smoothing=eps)``) moves each
target to ``(1 - eps) y + eps / 2``, the two-class case of the rule above; torch's binary
losses have no label smoothing.

Soft (probability) targets are not a difference between torch and optax: both compute
``-sum_c t_c log softmax(z)_c`` without renormalising ``t`` and smooth it as
``(1 - eps) t + eps / C``.

Sources: PyTorch's documentation of ``cross_entropy``; Megatron-LM
``megatron/core/tensor_parallel/cross_entropy.py``; optax's ``softmax_cross_entropy``,
``smooth_labels``; Keras 3's ``CategoricalCrossentropy``, ``SparseCategoricalCrossentropy``,
``BinaryCrossentropy``. The tests compare with torch, optax and Keras themselves.

>>> import numpy as np
>>> z, y = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), np.array([0, -100])
>>> [round(float(convention_loss(z, y, c, label_smoothing=0.1)), 4)
...  for c in ("torch", "megatron", "optax")]
[0.3729, 0.4395, 0.1864]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from array_api_compat import array_namespace

from .._checks import check_fraction, check_integer
from ..activations import log_softmax
from ..errors import InputError
from ..losses import softmax_cross_entropy, widened_and_counted

__all__ = ["CONVENTIONS", "Convention", "Terms", "convention_loss", "convention_terms",
           "explain"]


@dataclass(frozen=True)
class Convention:
    """One library's choices: where label smoothing goes (``"all"`` classes,
    ``"others"``: the non-target classes of the tensor-parallel partition, or ``"none"``:
    the library has no label smoothing), what the mean divides by (``"kept"`` rows or
    ``"all"`` rows) and, for ``"kept"``, the loss when no row is kept (``"nan"``: 0 / 0,
    or ``"zero"``).

    >>> CONVENTIONS["megatron"].smoothing, CONVENTIONS["torch"].denominator
    ('others', 'kept')
    """

    name: str
    smoothing: str
    denominator: str
    call: str
    nothing_kept: str = "nan"


CONVENTIONS = {
    "torch": Convention("torch", "all", "kept",
                        "F.cross_entropy(z, y, ignore_index=-100, label_smoothing=eps)"),
    "megatron": Convention("megatron", "others", "kept",
                           "vocab_parallel_cross_entropy(z, y, label_smoothing=eps), "
                           "masked mean"),
    "optax": Convention("optax", "all", "all",
                        "softmax_cross_entropy(z, smooth_labels(one_hot(y), eps)) * mask, "
                        "jnp.mean"),
    "keras": Convention("keras", "all", "all",
                        "CategoricalCrossentropy(from_logits=True, label_smoothing=eps)"
                        "(one_hot(y), z, sample_weight=mask)"),
    "keras-sparse": Convention("keras-sparse", "none", "kept",
                               "SparseCategoricalCrossentropy(from_logits=True, "
                               "ignore_class=-100)(y, z)", nothing_kept="zero"),
}


class Terms(NamedTuple):
    """``loss = (nll_weight * nll_sum + smoothing_weight * smoothing_sum) / denominator``.

    >>> import numpy as np
    >>> t = convention_terms(np.zeros((2, 4)), np.array([1, -100]), label_smoothing=0.1)
    >>> float(t.denominator), t.smoothing_classes, t.nll_weight  # one kept row, all 4 classes
    (1.0, (0, 4), 0.9)
    """

    nll_sum: Any
    smoothing_sum: Any
    smoothing_classes: tuple[int, int]
    nll_weight: float
    smoothing_weight: float
    denominator: Any
    loss: Any


def _quiet_nan() -> Any:
    """NumPy warns for 0 / 0; torch and jax return NaN quietly, and so does the mean of
    nothing here (the value is the libraries' own: NaN)."""
    import numpy as np

    return np.errstate(invalid="ignore", divide="ignore")


def _convention(convention: str | Convention) -> Convention:
    if isinstance(convention, Convention):
        allowed = {"smoothing": ("all", "others", "none"), "denominator": ("kept", "all"),
                   "nothing_kept": ("nan", "zero")}
        for field, values in allowed.items():
            if getattr(convention, field) not in values:
                raise InputError(f"convention: {field}={getattr(convention, field)!r} must be "
                                 f"one of {values}")
        return convention
    if convention not in CONVENTIONS:
        raise InputError(f"convention={convention!r}: expected one of {sorted(CONVENTIONS)}")
    return CONVENTIONS[convention]


def convention_terms(
    logits: Any,
    target: Any,
    convention: str | Convention = "torch",
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    tensor_parallel_size: int = 1,
    rank: int = 0,
) -> Terms:
    """The pieces of :func:`convention_loss` (see the module docstring), as arrays of the
    logits' library (differentiable where it is).

    Megatron on rank 1 of 2 smooths over that rank's classes 2 and 3 only:

    >>> import numpy as np
    >>> t = convention_terms(np.zeros((1, 4)), np.array([0]), "megatron", label_smoothing=0.1,
    ...                      tensor_parallel_size=2, rank=1)
    >>> t.smoothing_classes, round(t.smoothing_weight, 6)  # eps K / (K - 1), K = 2
    ((2, 4), 0.2)
    """
    conv = _convention(convention)
    eps = float(check_fraction(label_smoothing, "label_smoothing"))
    # a NumPy integer or a 0-d tensor becomes an int here: the mask below compares with it
    ignore_index = check_integer(ignore_index, "ignore_index")
    rank = check_integer(rank, "rank", minimum=0)
    xp = array_namespace(logits, target)
    if logits.ndim != 2 or tuple(target.shape) != (logits.shape[0],):
        raise InputError(f"logits must be (N, C) and target (N,); got shapes "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    num_classes = logits.shape[1]
    if (isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int)
            or tensor_parallel_size < 1 or num_classes % tensor_parallel_size):
        raise InputError(f"tensor_parallel_size={tensor_parallel_size!r} must be a positive "
                         f"integer dividing the {num_classes} classes")
    if not 0 <= rank < tensor_parallel_size:
        raise InputError(f"rank={rank!r} must be in [0, {tensor_parallel_size})")
    if tensor_parallel_size > 1 and conv.smoothing != "others":
        raise InputError(f"tensor_parallel_size: the {conv.name} convention's loss does not "
                         f"depend on the partition; leave it 1")
    rows = softmax_cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    # compared as the loss compares (a uint8 target's 156 is a class, not -100)
    kept = xp.astype(widened_and_counted(xp, target, ignore_index)[1], rows.dtype)
    if conv.smoothing == "none" and eps:
        raise InputError(f"label_smoothing={label_smoothing!r}: the {conv.name} convention "
                         f"has no label smoothing")
    if conv.smoothing in ("all", "none"):
        lo, hi = 0, num_classes
        weight = eps
    else:  # Megatron: eps over the K - 1 other classes of this rank's vocabulary slice
        width = num_classes // tensor_parallel_size
        if eps and (eps >= 1.0 or width < 2):
            raise InputError(f"label_smoothing={label_smoothing!r}: Megatron requires it "
                             f"below 1 and at least 2 classes per partition (got {width})")
        lo, hi = rank * width, (rank + 1) * width
        weight = eps * width / (width - 1) if eps else 0.0
    smoothing_rows = -xp.mean(log_softmax(logits, axis=-1)[:, lo:hi], axis=-1)
    nll_sum = xp.sum(rows)
    smoothing_sum = xp.sum(smoothing_rows * kept)
    denominator = xp.sum(kept) if conv.denominator == "kept" else float(logits.shape[0])
    numerator = (1.0 - weight) * nll_sum + weight * smoothing_sum
    if conv.denominator == "kept" and conv.nothing_kept == "zero":
        # divide_no_nan: the numerator is 0 when nothing is kept
        loss = numerator / xp.where(denominator == 0, xp.ones_like(denominator), denominator)
    else:
        with _quiet_nan():
            loss = numerator / denominator
    return Terms(nll_sum, smoothing_sum, (lo, hi), 1.0 - weight, weight, denominator, loss)


def convention_loss(
    logits: Any,
    target: Any,
    convention: str | Convention = "torch",
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    tensor_parallel_size: int = 1,
    rank: int = 0,
) -> Any:
    """Mean cross-entropy of ``logits (N, C)`` against class indices ``target (N)`` as
    ``convention`` (a name in :data:`CONVENTIONS` or a :class:`Convention`)
    computes it: ``((1 - s) A + s B) / D`` (module docstring). ``tensor_parallel_size`` and
    ``rank`` only for Megatron: which rank's loss. Returns a 0-d array of the logits' library.

    >>> import numpy as np
    >>> float(convention_loss(np.zeros((2, 4)), np.array([1, 2]), "megatron"))  # ln 4
    1.3862943611198906
    """
    return convention_terms(logits, target, convention, label_smoothing=label_smoothing,
                            ignore_index=ignore_index, tensor_parallel_size=tensor_parallel_size,
                            rank=rank).loss


def explain(
    logits: Any,
    target: Any,
    a: str | Convention = "torch",
    b: str | Convention = "megatron",
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    tensor_parallel_size: int = 1,
    rank: int = 0,
) -> str:
    """A table, term by term, of why conventions ``a`` and ``b`` give different losses for
    this input (``*`` marks the terms that differ; the last line is each loss).

    >>> import numpy as np
    >>> z, y = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), np.array([0, -100])
    >>> print(explain(z, y, "torch", "megatron", label_smoothing=0.1))
    term                                             torch     megatron
    A  sum_kept (lse - z_y)                         0.2395       0.2395
    B  sum_kept mean_{c in S} (lse - z_c)           1.5729       1.5729
       S (classes of the smoothing mean)            [0, 3)       [0, 3)
    1 - s  (weight of A)                            0.9000       0.8500  *
    s      (weight of B)                            0.1000       0.1500  *
    D  (denominator)                                1.0000       1.0000
    loss = ((1 - s) A + s B) / D                    0.3729       0.4395  *
    """
    ca, cb = _convention(a), _convention(b)

    def terms(c: Convention) -> Terms:
        partitioned = c.smoothing == "others"  # only Megatron's loss depends on the rank
        return convention_terms(logits, target, c, label_smoothing=label_smoothing,
                                ignore_index=ignore_index,
                                tensor_parallel_size=tensor_parallel_size if partitioned else 1,
                                rank=rank if partitioned else 0)

    ta, tb = terms(ca), terms(cb)

    def line(label: str, x: Any, y: Any) -> str:
        if isinstance(x, tuple):
            left, right, same = f"[{x[0]}, {x[1]})", f"[{y[0]}, {y[1]})", x == y
        else:
            fx, fy = float(x), float(y)
            left, right = f"{fx:.4f}", f"{fy:.4f}"
            same = abs(fx - fy) <= 1e-12 * max(1.0, abs(fx), abs(fy))
        return f"{label:<42}{left:>12} {right:>12}" + ("" if same else "  *")

    return "\n".join([
        f"{'term':<42}{ca.name:>12} {cb.name:>12}",
        line("A  sum_kept (lse - z_y)", ta.nll_sum, tb.nll_sum),
        line("B  sum_kept mean_{c in S} (lse - z_c)", ta.smoothing_sum, tb.smoothing_sum),
        line("   S (classes of the smoothing mean)", ta.smoothing_classes,
             tb.smoothing_classes),
        line("1 - s  (weight of A)", ta.nll_weight, tb.nll_weight),
        line("s      (weight of B)", ta.smoothing_weight, tb.smoothing_weight),
        line("D  (denominator)", ta.denominator, tb.denominator),
        line("loss = ((1 - s) A + s B) / D", ta.loss, tb.loss),
    ])
