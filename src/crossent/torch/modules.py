"""``nn.Module`` wrappers: swap ``torch.nn.CrossEntropyLoss`` / ``LinearCrossEntropyLoss``
for these in one line (same constructor arguments, plus crossent's extras)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import _checks
from ..errors import InputError, UnsupportedError
from ._backends import check_backend
from ._custom_ops import compiling, fx_tracer, fx_tracing, record_fx_call
from ._rules import check_flag, check_options, legacy_flag
from .functional import cross_entropy, linear_cross_entropy

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]


def _statistics_keyword(statistics: str | Sequence[str] | None) -> dict[str, Any]:
    """``statistics=`` passed on only when given: the functions' typed overloads return a
    tensor without it and a (loss, statistics) pair with it."""
    return {} if statistics is None else {"statistics": statistics}


class _NotScriptable:
    """``torch.jit.script`` refused by name: TorchScript cannot compile crossent's Python
    kernels (it would fail deep inside its compiler on ``forward``'s keywords)."""

    def __prepare_scriptable__(self) -> Any:
        raise UnsupportedError(f"torch.jit.script of crossent.torch.{type(self).__name__}: "
                               f"TorchScript cannot compile crossent's kernels; use "
                               f"torch.compile (or torch.jit.trace)")


def _check_weight_tensor(weight: Any, num_classes: int | None = None) -> None:
    """A class weight given to a module's constructor is ``None`` or a tensor (of
    ``num_classes`` entries when that is known): it becomes the ``weight`` buffer."""
    if weight is not None and not isinstance(weight, torch.Tensor):
        expected = "a tensor of class weights" if num_classes is None else (
            f"a tensor of {num_classes} class weights")
        raise InputError(f"weight must be {expected}, got {type(weight).__name__}")
    if weight is not None and num_classes is not None and tuple(weight.shape) != (num_classes,):
        raise InputError(f"weight has shape {tuple(weight.shape)}; expected "
                         f"({num_classes},), one weight per class")


def _traced_inside_a_model(module: nn.Module, *values: Any) -> bool:
    """``torch.fx.symbolic_trace`` of a model holding ``module`` (a proxy among the
    forward's ``values``): torch's loss modules are leaves there (one ``call_module`` node
    reading the module's attributes when the graph runs); crossent's become one
    ``call_function`` node of their forward's function on the module, which reads them
    when the graph runs too. (A forward hook on the module runs where the module was
    traced, and one added after tracing does not run: torch's leaf runs its hooks when
    the graph runs.) A trace of the module itself records the functional call with the
    attributes as constants, as a trace of torch's module records ``F.cross_entropy``."""
    tracer = fx_tracer(*values)
    return tracer is not None and getattr(tracer, "root", None) is not module


def _cross_entropy_forward(module: CrossEntropyLoss, input: torch.Tensor,
                           target: torch.Tensor, num_items: Any = None,
                           statistics: Any = None) -> Any:
    """:meth:`CrossEntropyLoss.forward` (also as a traced ``torch.fx`` graph runs it)."""
    return cross_entropy(
        input, target, module.weight, ignore_index=module.ignore_index,
        reduction=module.reduction, label_smoothing=module.label_smoothing,
        z_loss=module.z_loss, softcap=module.softcap,
        inplace_backward=module.inplace_backward, loss_dtype=module.loss_dtype,
        num_items=num_items, backend=module.backend, **_statistics_keyword(statistics),
    )


class CrossEntropyLoss(_NotScriptable, nn.CrossEntropyLoss):
    """:func:`crossent.torch.cross_entropy` as a module; a subclass of
    ``torch.nn.CrossEntropyLoss`` with the same constructor (``weight``, ``size_average``,
    ``ignore_index``, ``reduce``, ``reduction``, ``label_smoothing``) plus the keyword-only
    ``z_loss``, ``softcap``, ``inplace_backward`` (destroys the logits; see the function),
    ``loss_dtype`` (e.g. ``torch.float32`` for a float32 loss from bfloat16 logits) and
    ``backend`` (``"auto"``, ``"native"``, ``"rowblock"`` or ``"triton"``). ``forward``
    takes the keyword ``num_items`` (per batch: the count the summed loss is divided by,
    for gradient accumulation; see :func:`crossent.torch.cross_entropy`).

    >>> import torch
    >>> loss = CrossEntropyLoss(label_smoothing=0.1)
    >>> round(loss(torch.zeros(2, 3), torch.tensor([0, 2])).item(), 6)  # ln 3
    1.098612
    """

    def __init__(self, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: float | None = None,
                 inplace_backward: bool = False, loss_dtype: torch.dtype | None = None,
                 backend: str = "auto") -> None:
        # torch's constructor reads these with raw errors (TypeError, ambiguous truth)
        _check_weight_tensor(weight)
        size_average, reduce = legacy_flag(size_average, "size_average"), legacy_flag(
            reduce, "reduce")
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss, self.softcap = z_loss, softcap
        self.inplace_backward = check_flag(inplace_backward, "inplace_backward")
        self.loss_dtype, self.backend = loss_dtype, check_backend(backend)

    def forward(self, input: torch.Tensor, target: torch.Tensor, *,
                num_items: int | float | torch.Tensor | None = None,
                statistics: str | Sequence[str] | None = None) -> Any:
        """The loss; with ``statistics`` a ``(loss, TokenStatistics)`` pair (see
        :func:`crossent.torch.cross_entropy`)."""
        if _traced_inside_a_model(self, input, target, num_items):
            return record_fx_call(_cross_entropy_forward, (self, input, target),
                                  {"num_items": num_items, "statistics": statistics},
                                  "crossent.torch.CrossEntropyLoss")
        return _cross_entropy_forward(self, input, target, num_items, statistics)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, inplace_backward={self.inplace_backward}, "
                f"loss_dtype={self.loss_dtype}, backend={self.backend!r}")


# torch >= 2.13 ships the module: subclass it (isinstance checks hold, as for
# CrossEntropyLoss); its __init__ is not run (ours sets the same attributes and raises
# crossent's InputError where torch's raises a RuntimeError)
_LinearLossBase: type[nn.Module] = getattr(nn, "LinearCrossEntropyLoss",
                                          nn.modules.loss._WeightedLoss)


def _check_head_sizes(in_features, num_classes, out_features) -> tuple[int, tuple[int, ...]]:
    """Integers >= 0 whose weight, ``(num_classes * prod(out_features), in_features)``,
    fits int64 (``nn.Linear`` would raise a raw TypeError/RuntimeError); returns
    ``num_classes`` and ``out_features`` as Python ints (``out_features`` a tuple, read
    once: an iterator is consumed)."""
    size = _checks.check_integer(in_features, "in_features", minimum=0,
                                 maximum=_checks.INDEX_MAX)
    classes = _checks.check_integer(num_classes, "num_classes", minimum=0,
                                    maximum=_checks.INDEX_MAX)
    size *= classes
    try:
        extra = tuple(_checks.check_integer(n, "out_features", minimum=0,
                                            maximum=_checks.INDEX_MAX) for n in out_features)
    except TypeError:
        raise InputError(f"out_features={out_features!r} must be a tuple of integers") from None
    size *= math.prod(extra)
    if size > _checks.INDEX_MAX:
        raise InputError(f"in_features={in_features!r}, num_classes={num_classes!r} and "
                         f"out_features={extra!r} make a weight of {size} entries, beyond "
                         f"int64")
    return classes, extra


def _head_parameters(w: torch.Tensor, b: torch.Tensor | None, num_classes: Any,
                     out_features: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias shaped for :func:`linear_cross_entropy`, after checking
    the module's sizes, which may have been assigned after construction (torch's module
    reshapes the weight to them and raises; a head must not score another number of
    classes silently, nor take a size the constructor refuses)."""
    if not compiling():  # dynamo may make the sizes symbolic: its reshape checks them
        if not isinstance(out_features, (tuple, list)):  # an iterator would be read once
            raise InputError(f"out_features={out_features!r} must be a tuple of integers")
        num_classes, out_features = _check_head_sizes(0, num_classes, out_features)
    rows = math.prod(out_features, start=num_classes)
    if w.dim() != 2 or w.shape[0] != rows or (b is not None and b.shape != (rows,)):
        bias = "" if b is None else f" (linear.bias {tuple(b.shape)})"
        raise InputError(f"linear.weight has shape {tuple(w.shape)}{bias}, but "
                         f"num_classes={num_classes!r} and out_features={out_features!r} "
                         f"need {rows} rows")
    if out_features:  # stored 2-D, as torch's module stores it
        w = w.reshape(num_classes, *out_features, w.shape[1])
        b = None if b is None else b.reshape(num_classes, *out_features)
    return w, b


_HEAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""What ``nn.Linear`` can initialise and crossent's head computes with (float8 cannot be
initialised; integers and complex numbers have no cross-entropy gradient here)."""


class LinearCrossEntropyLoss(_NotScriptable, _LinearLossBase):  # type: ignore[misc, valid-type]
    """A linear head and its cross-entropy, fused: :func:`crossent.torch.linear_cross_entropy`.

    Same constructor as ``torch.nn.LinearCrossEntropyLoss`` (torch >= 2.13): the head is
    ``self.linear = nn.Linear(in_features, num_classes * prod(out_features), bias=bias)``
    (same state-dict keys); ``options`` (``torch.nn.LinearCrossEntropyOptions``) is
    honoured as in :func:`crossent.torch.linear_cross_entropy`, ``chunk_size`` is its
    shorthand; ``z_loss``, ``softcap``, ``loss_dtype``, ``backend`` and ``shift`` (the
    causal-LM label shift: ``(B, T, D)`` input, ``(B, T)`` target) are extras, and
    ``forward`` takes the keyword ``num_items`` (see
    :func:`crossent.torch.linear_cross_entropy`). K-dimensional heads
    (``out_features != ()``) form their logits whole, as torch does.

    >>> import torch
    >>> head = LinearCrossEntropyLoss(4, 3)
    >>> _ = torch.nn.init.zeros_(head.linear.weight)
    >>> round(head(torch.ones(2, 4), torch.tensor([0, 1])).item(), 6)  # ln 3
    1.098612
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: torch.Tensor | None = None, ignore_index: int | None = None,
                 label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                 softcap: float | None = None, chunk_size: int | None = None,
                 loss_dtype: torch.dtype | None = None, backend: str = "auto",
                 shift: bool = False) -> None:
        # torch's constructor checks (weight's shape, label_smoothing), and crossent's
        # other options, here rather than at the first forward
        check_options(reduction, label_smoothing, z_loss, softcap)
        num_classes, out_features = _check_head_sizes(in_features, num_classes, out_features)
        _check_weight_tensor(weight, num_classes)
        if dtype is not None and dtype not in _HEAD_DTYPES:
            raise InputError(f"dtype={dtype!r}: the head's parameters take one of "
                             f"{', '.join(map(str, _HEAD_DTYPES))}")
        nn.modules.loss._WeightedLoss.__init__(self, weight=weight, size_average=None,
                                               reduce=None, reduction=reduction)
        self.num_classes, self.out_features = num_classes, tuple(out_features)
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.z_loss, self.softcap, self.chunk_size = z_loss, softcap, chunk_size
        self.options, self.loss_dtype = options, loss_dtype
        self.backend, self.shift = check_backend(backend), check_flag(shift, "shift")
        self.linear = nn.Linear(in_features, math.prod(out_features, start=num_classes),
                                bias=bias, device=device, dtype=dtype)

    def forward(self, input: torch.Tensor, target: torch.Tensor, *,
                num_items: int | float | torch.Tensor | None = None,
                statistics: str | Sequence[str] | None = None) -> Any:
        """The loss; with ``statistics`` a ``(loss, TokenStatistics)`` pair (see
        :func:`crossent.torch.linear_cross_entropy`)."""
        if _traced_inside_a_model(self, input, target, num_items):
            return record_fx_call(_linear_forward, (self, input, target),
                                  {"num_items": num_items, "statistics": statistics},
                                  "crossent.torch.LinearCrossEntropyLoss")
        return _linear_forward(self, input, target, num_items, statistics)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}, chunk_size={self.chunk_size}, "
                f"loss_dtype={self.loss_dtype}, backend={self.backend!r}, shift={self.shift}")


def _linear_forward(module: LinearCrossEntropyLoss, input: torch.Tensor,
                    target: torch.Tensor, num_items: Any = None,
                    statistics: Any = None) -> Any:
    """:meth:`LinearCrossEntropyLoss.forward` (also as a traced ``torch.fx`` graph runs
    it)."""
    w: torch.Tensor = module.linear.weight
    b: torch.Tensor | None = module.linear.bias
    if fx_tracing(w):  # tracing the module itself: its parameters are proxies
        head = record_fx_call(_head_parameters, (w, b, module.num_classes,
                                                 module.out_features), {},
                              "crossent.torch.LinearCrossEntropyLoss")
        w, b = head[0], head[1]
    else:
        w, b = _head_parameters(w, b, module.num_classes, module.out_features)
    return linear_cross_entropy(
        input, w, target, b, weight=module.weight,
        reduction=module.reduction, ignore_index=module.ignore_index,
        label_smoothing=module.label_smoothing, z_loss=module.z_loss, softcap=module.softcap,
        chunk_size=module.chunk_size, options=module.options, loss_dtype=module.loss_dtype,
        num_items=num_items, backend=module.backend, shift=module.shift,
        **_statistics_keyword(statistics),
    )
