"""``torch.compile`` without a graph break: the fused losses as custom operators.

The fused kernels are loops of tensor operations with host-side checks (``bool(t.any())``,
``data_ptr`` comparisons) and a gradient computed in forward: traced by dynamo they would
break the graph at every check and unroll into one graph per shape. Under
``torch.compile`` (and ``torch.export``) the public entry points therefore call one opaque
operator per loss instead, registered with :func:`torch.library.custom_op`:

``crossent::cross_entropy_fwd`` / ``crossent::cross_entropy_bwd``
    the loss and the gradient of the logits; the backward operator recomputes the
    gradients a forward pass cannot store (a probability target's, a class weight's) or
    should not (float16 logits': :func:`_recomputes_float16`).
``crossent::linear_cross_entropy_fwd`` / ``crossent::linear_cross_entropy_bwd``
    the chunked linear head: loss and ``dx``, ``dW``, ``db`` (``reduction="none"``,
    target/weight gradients and float16 heads in the backward operator, from the real
    ``grad_output``).

The forward operators also return the six ``statistics=`` tensors (0-element where not
asked; the entry point rebuilds :class:`crossent.torch.TokenStatistics`).

Each operator's implementation runs the eager entry point itself (registered here by
:func:`compilable`, the decorator of :func:`crossent.torch.cross_entropy` and
:func:`crossent.torch.linear_cross_entropy`), so every check, backend choice and number is
eager crossent's: the forward operator asks the eager function's own autograd for the
gradient with ``grad_output = 1`` (the fused kernels computed it in forward: no second
pass; but see the operators above for what is recomputed), the registered backward
multiplies it by the real ``grad_output`` (per row for
``reduction="none"``), as the eager backward does, with torch ops only (no host read, no
branch on values: :func:`_scale_logits_grad`, :func:`_scale_head_grads`). The fake (meta)
implementations give the shapes and dtypes, so dynamic shapes
(``torch._dynamo.mark_dynamic``) trace once.

Rules under ``torch.compile``:

* Checks that read tensor values (class indices in range, ``num_items > 0``) and option
  checks run when the compiled code runs, inside the operator: bad input raises
  :class:`crossent.InputError` (``IndexError`` for an out-of-range class, as torch) then,
  not at trace time (dynamo would turn a trace-time exception into its own error). An
  argument of a type no operator can carry (a list as ``target``, ``reduction=None``; NumPy
  scalars, which reach dynamo as arrays) is found while tracing and raises
  :class:`crossent.InputError` naming it when the code runs (``crossent::input_error``).
* ``inplace_backward=True`` is ignored: an operator may not mutate its inputs, so the
  logits are left intact (as on the native route of small inputs); the gradient is an
  extra ``N x C`` buffer.
* Every forward operator takes :data:`FORMULA`, a digest of the code traced around it:
  torch's compile caches key on the traced graph and trust an operator's name, so a
  crossent whose autograd formulas changed compiles afresh (no stale backward graph).
* Double backward (``create_graph=True``) raises :class:`crossent.UnsupportedError`
  (torch's AOT backends refuse it too); run the loss eagerly for Hessians. Backward twice
  (``retain_graph=True``) works: the stored gradients are not consumed (not under
  ``dynamic=True``, where AOTAutograd's donated buffers refuse it, also for torch's own
  compiled loss: "compiled with non-empty donated buffers", review H109).
* A ``grad_output`` other than 1 multiplies the gradients returned by the operator, in
  the loss's compute dtype (float32 for bfloat16/float16), each product rounded once.
  Those gradients are eager's at ``grad_output = 1``, already rounded to the input's
  dtype (for float32 and bfloat16 a power of two, a ``GradScaler``'s scale, multiplies
  them exactly in the normal range). Not float16's (:func:`_recomputes_float16`): there
  the backward operator runs the eager entry point again with the real ``grad_output``,
  from a copy of the logits made in forward (an in-place change of them after forward,
  which torch allows, changes nothing) or, for the linear head, from what torch's
  ``F.linear`` saves and copies of the rest (:func:`_head_copy_dtypes`), so the gradients
  are eager's bitwise at every scale. Stored at unit scale they had been rounded twice,
  every float16 entry under 6.1e-5 a subnormal or 0 before a ``GradScaler``'s 2**16
  (review H105: 1024 x 8192, relative error 8.6e-4 against float64 where eager's is
  6.4e-5; the head's dx and dW most entries off eager's). Costs: forward computes the
  loss alone and backward the forward again (1024 x 8192 on CPU: 30 ms for both, was 56;
  a 2048 x 512 x 8192 head 1.4-1.5x its stored-gradient time).
* A NaN or infinite ``grad_output`` (0-d or per row) gives torch's (and eager crossent's)
  values and NaN/inf pattern for ``cross_entropy``, without a host read: the product
  takes a per-row factor that is 0 on the rows torch leaves alone (ignored rows stay 0,
  or NaN where their softmax is NaN, never ``0 * inf``); an infinite one makes the
  counted rows' target entries NaN (torch's ``inf - inf``; an O(N) gather and scatter),
  whole counted rows with probability targets or label smoothing, and with a z-loss the
  counted rows whose ``z_loss * lse <= 0`` (torch's formula adds infinities of opposite
  signs there; on CPU forward also returns the rows' lse for this, review H86-3; on CUDA
  those rows are ``+-inf``, not checked without a GPU). One difference, on
  every device: an infinite ``grad_output`` times a stored entry that rounded to 0 (a
  bfloat16 logit ~92 nats below its row's top; ``p_j / N`` under float32's subnormals)
  is NaN where eager torch's is ``+-inf`` (eager crossent recomputes there, on CPU);
  torch 2.13's own inductor graph gives NaN on every entry of the counted rows for any
  infinite ``grad_output``. A recompute would need the logits in backward, and saving
  them made every backward raise after an in-place change of them, which torch's loss
  allows (review H84); float16 logits, recomputed from a copy, are eager's there. On CPU
  the scaling is an operator, ``crossent::scale_stored_grad_cpu``, that reads the target,
  so AOTAutograd saves it and an in-place change before backward raises as torch's; on
  CUDA the scaling is traced torch operations (which read the target too). The class
  weight and a ``num_items`` tensor, which torch's own backward reads too, the backward passes to
  ``crossent::read_saved``, for the same reason, on every device. Not the linear head's
  ``input`` and ``linear_weight`` (which ``F.linear`` saves): the compiled head keeps
  neither alive for backward (a float16 head keeps W, and x where W needs a gradient, for
  the recompute, so a change of them raises as torch's; under autocast it keeps their
  casts, as torch's ``F.linear`` does),
  so an in-place change of them before backward is not noticed there (eager crossent
  watches them without keeping them alive). The linear head
  (``"mean"``/``"sum"``; ``"none"`` recomputes with the real ``grad_output`` in the
  backward operator): ``dx`` as torch's (NaN on counted rows, 0 on ignored ones);
  ``dW``/``db`` 0 where no row counts, all NaN under an infinite one with probability
  targets or label smoothing (as torch's), else the stored ones times ``grad_output``.
  That last part (not float16 heads: recomputed) differs from torch under an infinite
  ``grad_output`` with index targets:
  torch's ``dW``/``db`` are sums of infinities, NaN on the classes a counted row targets
  and where the counted rows' features differ in sign, where here they are ``+-inf``
  (as on the Triton heads;
  the eager row-block head recomputes that step with torch ops, which a compiled
  backward cannot do without a host read). A strict xfail in
  ``tests/torch/test_compile_grad_output.py`` records it.
* A ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``jacrev``) of a compiled
  function: the call leaves the graph and runs the eager entry point, which takes the
  transforms (:func:`_under_func_transform`; a graph break). Two limits of dynamo's
  ``"eager"`` backend, both errors, are in ``docs/guarantees.md`` (review H95).
* Under autocast a float16/bfloat16 class weight is not saved for its version (torch's
  autocast hands the loss a float32 copy, which is what torch saves), and where backward
  recomputes it reads that float32 copy, an output of the forward operator
  (:func:`_autocast_copies_weight`, reviews H111-1, H112-1).
* ``num_items`` as a Python number is a constant of the compiled graph (a new value
  recompiles); give a 0-d tensor (the Trainer's ``num_items_in_batch``) to avoid that.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
import torch.fx
from torch.nn import _reduction

from .. import __version__, _checks
from ..errors import InputError, UnsupportedError
from ._rules import (
    LOW_PRECISION,
    choose_loss_dtype,
    compute_dtype,
    infinite_as_nan,
    legacy_flag,
    linear_cast_dtype,
    promote_with_target,
)
from ._statistics import STATISTICS, TokenStatistics

__all__ = [
    "compilable",
    "compiled_cross_entropy",
    "compiled_linear_cross_entropy",
    "compiling",
]

P = ParamSpec("P")
R = TypeVar("R")

# the eager entry points, by name: registered by :func:`compilable` (this module imports
# none of them: no import circle), called by the operators' implementations
_EAGER: dict[str, Callable[..., torch.Tensor]] = {}


def compiling() -> bool:
    """dynamo is tracing (``torch.compile``, ``torch.export``): the custom operators serve.
    (A ``FakeTensorMode`` without dynamo runs the eager entry point, whose checks and
    autograd then hold; it routes fake tensors to plain torch operations,
    :func:`crossent.torch._rules.fake_values`.)"""
    return torch.compiler.is_compiling()


# the eager entry points wrapped in torch.compiler.disable, by name: made while dynamo
# traces (by _under_func_transform), so that importing crossent.torch imports no dynamo
_UNTRACED: dict[str, Callable[..., Any]] = {}


def _under_func_transform(name: str) -> bool:
    """A ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``jacrev``) of a compiled
    function is running (review H86-1). torch's custom operators have no rule for them
    (their autograd is an ``autograd.Function`` without ``setup_context``: dynamo failed
    with "must override the setup_context staticmethod"), so the call leaves the graph
    and runs the eager entry point, which takes the transforms (the composable path):
    ``_UNTRACED[name]``, made here, a graph break (an error under ``fullgraph=True``).
    Run, not traced, by dynamo, which takes the result as a constant of the graph
    (:func:`torch.compiler.assume_constant_result`) and guards compiled code on the
    transforms around it, so that it traces afresh under others."""
    active = torch._C._functorch.maybe_current_level() is not None
    if active and name not in _UNTRACED:
        _UNTRACED[name] = torch.compiler.disable(_EAGER[name], recursive=True, reason=(
            f"crossent.torch.{name} under a torch.func transform of a compiled function "
            f"runs eagerly (torch's custom operators take no transform): a graph break"))
    return active


# torch.compiler.assume_constant_result sets this mark and nothing else (torch 2.13:
# tests/torch/test_session25_scale_stored_review.py checks it), but imports dynamo, a
# second on crossent.torch's import: the mark is set here instead
_under_func_transform._dynamo_marked_constant = True  # type: ignore[attr-defined]


def compilable(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator of a public entry point: eager calls run it as it is; under
    ``torch.compile`` the call becomes the custom operators (``compiled_<name>``, same
    signature), whose implementations run the undecorated function eagerly."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        _EAGER[name] = fn  # type: ignore[assignment]
        compiled: Callable[..., Any] = _COMPILED[name]

        @functools.wraps(fn, updated=())  # not __dict__: no compiler.disable marks
        def entry(*args: P.args, **kwargs: P.kwargs) -> R:
            if compiling():
                if _under_func_transform(name):  # torch's custom operators take none
                    return _UNTRACED[name](*args, **kwargs)
                return compiled(*args, **kwargs)
            if fx_tracing(*args, *kwargs.values()):
                return record_fx_call(entry, args, kwargs, f"crossent.torch.{name}")
            return fn(*args, **kwargs)

        return entry

    return decorate


try:  # torch's flag (a global read): proxies exist only while symbolic_trace runs
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_active
except ImportError:  # an older torch: look at the values every call
    def _fx_active() -> bool:
        return True


def fx_tracer(*values: Any) -> Any:
    """The tracer of the first ``torch.fx`` proxy among ``values`` (``symbolic_trace`` is
    tracing the caller), or None. Outside tracing it reads one flag: it is on the path of
    every call (about 1 us to scan the arguments, against the small-input path's 2.6)."""
    if not _fx_active():
        return None
    return next((v.tracer for v in values if isinstance(v, torch.fx.Proxy)), None)


def fx_tracing(*values: Any) -> bool:
    """Whether a value is a ``torch.fx`` proxy: ``symbolic_trace`` is tracing the caller."""
    return fx_tracer(*values) is not None


def record_fx_call(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any],
                   name: str) -> Any:
    """``fn(*args, **kwargs)`` recorded as one ``call_function`` node of the ``torch.fx``
    graph being traced (as torch's own functions are recorded): the checks and kernels read
    values, which a proxy does not have; the traced graph runs ``fn`` on tensors. ``name``
    (the public function or module) is what an error names."""
    tracer = fx_tracer(*args, *kwargs.values())
    args = tuple(_python_number(v) for v in args)
    kwargs = {k: _python_number(v) for k, v in kwargs.items()}
    try:
        return tracer.create_proxy("call_function", fn, args, kwargs)
    except (NotImplementedError, NameError) as err:  # what fx cannot put in a graph
        raise UnsupportedError(f"torch.fx tracing of {name}: {err}") from None


def _python_number(value: Any) -> Any:
    """A NumPy scalar as the Python number it holds: fx's generated code has no ``np``."""
    return value.item() if isinstance(value, np.generic) else value


# ---- running the eager entry point inside an operator

# the implementations synchronise with the host (the class-index bounds check, as torch's
# own): CUDA graphs (mode="reduce-overhead") must not capture them
_TAGS = (torch.Tag.cudagraph_unsafe,)


def _formula() -> str:
    """A digest of the code torch traces into compiled graphs around the operators (their
    autograd formulas here, the rules they call): an argument of every forward operator,
    so that it is in the graph dynamo hands on. torch's AOTAutograd cache keys on that
    graph and takes an operator's name for its behaviour, so without it a crossent whose
    formulas changed could reuse a backward graph compiled for the old ones (seen at stop
    34: "missing value for argument" until ``/tmp/torchinductor_*`` was cleared)."""
    here = pathlib.Path(__file__).parent
    digest = hashlib.sha256()
    for name in ("_custom_ops.py", "_rules.py", "_statistics.py"):
        try:
            digest.update((here / name).read_bytes())
        except OSError:  # pragma: no cover - installed without sources: the version only
            digest.update(name.encode())
    return f"crossent {__version__} {digest.hexdigest()[:16]}"


FORMULA = _formula()

_AUTOGRAD_KEYS = ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor")


def _autograd_recording() -> contextlib.AbstractContextManager:
    """An operator's implementation runs below autograd's dispatch keys (its autograd is
    the registered formula): let autograd record again inside it, so the eager entry
    point's own autograd Function can hand over the gradient it stored in forward."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                           exclude)


def _autocast_state(device_type: str, dtype: torch.dtype | None):
    """Autocast as it was where the loss was traced (AOT backends run the graph without
    it, having traced its casts): the eager entry point then follows it as eagerly."""
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


def _run_eager(name: str, tensors: dict[str, torch.Tensor | None], requires: Sequence[bool],
               options: dict[str, Any], autocast: torch.dtype | None,
               grad_output: torch.Tensor | None, want_grads: bool,
               statistics: str | None = None):
    """``(loss, grads, stats)``: the eager entry point's loss, if ``want_grads`` the
    gradients of the tensors whose ``requires`` is set (``grad_output`` or ones), each
    contiguous (``None`` for the others), and the ``statistics`` it returned (names joined
    by commas; ``None``: off)."""
    if statistics is not None:
        options = {**options, "statistics": _names(statistics)}
    device_type = next(t for t in tensors.values() if t is not None).device.type
    with _autograd_recording(), torch.enable_grad(), _autocast_state(device_type, autocast), \
            _without_callers_hooks():
        leaves = {k: None if t is None else t.detach().requires_grad_(bool(r))
                  for (k, t), r in zip(tensors.items(), requires, strict=True)}
        loss = _EAGER[name](**{**leaves, **options})  # a number num_items replaces None
        stats = None
        if statistics is not None:
            loss, stats = loss
        wanted = [t for t, r in zip(leaves.values(), requires, strict=True)
                  if r and t is not None]
        grads: list[torch.Tensor | None] = [None] * len(requires)
        if want_grads and wanted:
            # no logits (C = 0, every row ignored): eager's loss may have no graph; torch's
            # gradients are zeros. A graphless loss of real logits still raises here, but
            # for an exported training graph run under inference_mode (nothing records,
            # no backward can follow): placeholders of the promised shapes.
            empty = not loss.requires_grad and (_no_logits(tensors)
                                                or torch.is_inference_mode_enabled())
            found = iter([None] * len(wanted) if empty else torch.autograd.grad(
                loss, wanted, torch.ones_like(loss) if grad_output is None else grad_output,
                allow_unused=True))
            for i, (t, r) in enumerate(zip(leaves.values(), requires, strict=True)):
                if r and t is not None:
                    g = next(found)
                    grads[i] = (torch.zeros_like(t) if g is None else g).contiguous()
    return loss.detach().contiguous(), grads, stats


def _without_callers_hooks() -> contextlib.AbstractContextManager:
    """The inner graph is built and consumed in the operator: the caller's saved-tensor
    hooks (save_on_cpu, checkpointing, memory tools) must neither see nor move its
    tensors. Under ``disable_saved_tensors_hooks`` no hook can be active (torch refuses to
    disable them then) and none may be registered: nothing to shield."""
    if not torch._C._autograd._saved_tensors_hooks_is_enabled():  # type: ignore[attr-defined]
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is)


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def _run_time_requires(ctx, inputs, at: int) -> tuple[list[bool], bool, tuple]:
    """``(requires, want_grads, inputs[at:])`` for this run (``inputs[at]`` is the traced
    ``requires``, ``inputs[at + 1]`` ``want_grads``). ``torch.export`` bakes the example
    inputs' ``requires_grad`` flags into the graph, with no guard: a run may need a
    gradient the trace did not ask for. Then every gradient the run needs is recomputed
    in backward (as when the trace asked for a target or weight gradient)."""
    requires, want_grads = inputs[at], inputs[at + 1]
    needs = [bool(n) for n in ctx.needs_input_grad[:len(requires)]]
    if any(n and not r for n, r in zip(needs, requires, strict=True)):
        return needs, False, (needs, False, *inputs[at + 2:])
    return requires, want_grads, tuple(inputs[at:])


def _no_logits(tensors: dict[str, torch.Tensor | None]) -> bool:
    """No rows or no classes (``N * C = 0``): every gradient is zero."""
    target, input, head = tensors["target"], tensors["input"], tensors.get("linear_weight")
    assert target is not None and input is not None
    return target.numel() == 0 or (input.numel() == 0 if head is None else head.shape[0] == 0)


def _forward_requires(requires: Sequence[bool], want_grads: bool, primary: int) -> list[bool]:
    """What the forward operator tells the eager function needs a gradient: without
    ``want_grads`` (the backward operator computes them all) not the first ``primary``
    inputs (logits; x, W, b), so forward does no gradient work for them; the others' flags
    stay, so eager refuses in forward what it refuses (a class weight that requires grad
    with class-index targets, ``num_items`` that requires grad)."""
    return list(requires) if want_grads else [False] * primary + list(requires[primary:])


def _names(statistics: str) -> tuple[str, ...]:
    return tuple(n for n in statistics.split(",") if n)


def _statistics_arg(function: str, statistics) -> tuple[str | None, str | None]:
    """``statistics`` as one string for the operator (names joined by commas), and the
    problem of a value that is not ``None``, a name or a tuple of names."""
    if statistics is None:
        return None, None
    # any iterable of names, as eagerly (a dict view, a set: dynamo iterates them)
    names = ((statistics,) if isinstance(statistics, str)
             else tuple(statistics) if isinstance(statistics, Iterable) else None)
    if names is not None and all(isinstance(n, str) and n in STATISTICS for n in names):
        return ",".join(names), None
    return None, (f"statistics must be None, a name or a tuple of names from {STATISTICS} "
                  f"(crossent.torch.{function} under torch.compile)")


def _stats_outputs(stats: TokenStatistics | None, like: torch.Tensor) -> list[torch.Tensor]:
    """The six statistics outputs (``counted`` last), 0-element where not asked."""
    if stats is None:
        return [like.new_empty(0) for _ in TokenStatistics._fields]  # distinct: no aliases
    return [_or_empty(None if t is None else t.contiguous(), like) for t in stats]


def _fake_stats(statistics: str | None, shape: tuple, dtype: torch.dtype,
                like: torch.Tensor) -> list[torch.Tensor]:
    if statistics is None:
        return [like.new_empty(0) for _ in TokenStatistics._fields]
    names = _names(statistics)
    return [like.new_empty(shape, dtype=torch.bool if field in ("accuracy", "counted")
                           else dtype)
            if field in names or field == "counted" else like.new_empty(0)
            for field in TokenStatistics._fields]


def _token_statistics(statistics: str, outputs) -> TokenStatistics:
    names = _names(statistics)
    return TokenStatistics._make(t if field in names or field == "counted" else None
                                 for field, t in zip(TokenStatistics._fields, outputs,
                                                     strict=True))


def _with_statistics(loss: torch.Tensor, statistics: str | None, outputs):
    """What the eager function returns: the loss, or ``(loss, stats)``."""
    if statistics is None:
        return loss
    return loss, _token_statistics(statistics, outputs)


def _deferred_error(input, problem: str, statistics) -> Any:
    """The ``crossent::input_error`` operator in place of the loss (and its statistics)."""
    error = torch.ops.crossent.input_error(
        input.detach() if isinstance(input, torch.Tensor) else None, problem)
    if statistics is None:
        return error
    return error, TokenStatistics(None, None, None, None, None, error)


def _or_empty(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Operator outputs cannot be None: a gradient not asked for is a 0-element tensor."""
    return like.new_empty(0) if grad is None else grad


def _fake_grad(t: torch.Tensor | None, wanted: bool) -> torch.Tensor | None:
    return None if t is None or not wanted else _contiguous_copy(t, fake=True)


def _refuse_double_backward(name: str) -> None:
    if torch.is_grad_enabled():  # backward(create_graph=True)
        raise UnsupportedError(
            f"crossent.torch.{name} under torch.compile: double backward (create_graph=True)"
            f"; call the loss outside torch.compile for Hessians and gradient penalties")


# ---- arguments an operator cannot carry: their InputError is raised at run time too

_NONE = type(None)
_TENSOR = ("a tensor", (torch.Tensor,))
_OPTIONAL_TENSOR = ("a tensor or None", (torch.Tensor, _NONE))
_NUMBER = ("a number", (int, float))
_OPTIONAL_NUMBER = ("a number or None", (int, float, _NONE))
_COUNT = ("a number, a 0-d tensor or None", (int, float, torch.Tensor, _NONE))
_TEXT = ("a string", (str,))
_DTYPE = ("a torch.dtype or None", (torch.dtype, _NONE))
_FLAG = ("True or False", (bool, int, float))  # a number: the eager check names it
_BOOL = ("True or False", (bool,))  # not passed on: checked here


def _type_problem(function: str, checks) -> str | None:
    """The first argument whose type the operator cannot take, in words, or None.
    (NumPy scalars, which eager calls take, reach dynamo as arrays: refused here.)"""
    for name, value, (kind, types) in checks:
        if not isinstance(value, types):
            return (f"{name} must be {kind}, got {type(value).__name__} (crossent.torch."
                    f"{function} under torch.compile)")
    return None


@torch.library.custom_op("crossent::input_error", mutates_args=(), tags=_TAGS,
                         schema="(Tensor? like, str message) -> Tensor")
def _input_error(like, message):
    """Raises :class:`crossent.InputError` when the compiled code runs: an argument of the
    wrong type, found while tracing (where dynamo would replace the exception by its own)."""
    raise InputError(message)


@_input_error.register_fake
def _(like, message):
    return torch.empty(())


# ---- cross_entropy

_CE_TENSORS = ("input", "target", "weight", "num_items")
_CE_SCHEMA = (
    "(Tensor input, Tensor target, Tensor? weight, Tensor? num_items, bool[] requires, "
    "bool want_grads, bool copy_input, bool? size_average, Scalar? ignore_index, "
    "bool? reduce, str reduction, "
    "Scalar label_smoothing, Scalar z_loss, Scalar? softcap, ScalarType loss_dtype, "
    "Scalar? num_items_value, str backend, ScalarType? autocast, str? statistics, "
    "str formula)")
_STATS_RETURNS = "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor"


def _ce_options(size_average, ignore_index, reduce, reduction, label_smoothing, z_loss,
                softcap, loss_dtype, num_items_value, backend) -> dict[str, Any]:
    options = dict(size_average=size_average, ignore_index=ignore_index, reduce=reduce,
                   reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                   softcap=softcap, loss_dtype=loss_dtype, backend=backend)
    if num_items_value is not None:
        options["num_items"] = num_items_value
    return options


def _ce_tensors(input, target, weight, num_items) -> dict[str, torch.Tensor | None]:
    return dict(zip(_CE_TENSORS, (input, target, weight, num_items), strict=True))


@torch.library.custom_op("crossent::cross_entropy_fwd", mutates_args=(), tags=_TAGS,
                         schema=_CE_SCHEMA + f" -> (Tensor, Tensor, Tensor, {_STATS_RETURNS})")
def _cross_entropy_fwd(input, target, weight, num_items, requires, want_grads, copy_input,
                       size_average, ignore_index, reduce, reduction, label_smoothing, z_loss,
                       softcap, loss_dtype, num_items_value, backend, autocast, statistics,
                       formula):
    """The loss; with ``want_grads`` ``dloss/dinput`` for ``grad_output = 1``, with
    ``copy_input`` a contiguous copy of ``input`` (backward recomputes from it:
    :func:`_recomputes_float16`) in its place; the float32 copy of the class weight
    autocast makes, where backward recomputes from it (:func:`_autocast_copies_weight`);
    and the statistics asked for (``formula``: :data:`FORMULA`, for the compile caches
    only)."""
    del formula
    loss, grads, stats = _run_eager(
        "cross_entropy", _ce_tensors(input, target, weight, num_items),
        _forward_requires(requires, want_grads, 1),
        _ce_options(size_average, ignore_index, reduce, reduction, label_smoothing, z_loss,
                    softcap, loss_dtype, num_items_value, backend),
        autocast, None, want_grads, statistics)
    grad_or_copy = _contiguous_copy(input) if copy_input else grads[0]
    weight_copy = _weight_copy(weight, autocast, copy_input)
    return (loss, _or_empty(grad_or_copy, input), _or_empty(weight_copy, input),
            *_stats_outputs(stats, input))


def _autocast_copies_weight(weight: torch.Tensor | None, autocast: torch.dtype | None) -> bool:
    """Whether torch's autocast hands ``cross_entropy`` a float32 copy of ``weight`` (a
    float16/bfloat16 class weight; autocast runs the loss in float32), which its backward
    then saves: an in-place change of the caller's weight after forward is not seen there.
    So the compiled operators neither save it for its version (the stored path) nor
    recompute from it (a float32 copy instead; review H111-1)."""
    return autocast is not None and weight is not None and weight.dtype in LOW_PRECISION


def _ce_loss_shape(input: torch.Tensor, reduction: str) -> tuple:
    if reduction != "none" or input.dim() < 2:
        return ()
    return (input.shape[0], *input.shape[2:])


@_cross_entropy_fwd.register_fake
def _(input, target, weight, num_items, requires, want_grads, copy_input, size_average,
      ignore_index, reduce, reduction, label_smoothing, z_loss, softcap, loss_dtype,
      num_items_value, backend, autocast, statistics, formula):
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    loss = input.new_empty(_ce_loss_shape(input, reduction), dtype=loss_dtype)
    grad_or_copy = _fake_grad(input, copy_input or (want_grads and requires[0]))
    weight_copy = _weight_copy(weight, autocast, copy_input, fake=True)
    return (loss, _or_empty(grad_or_copy, input), _or_empty(weight_copy, input),
            *_fake_stats(statistics, _ce_loss_shape(input, "none"),
                         compute_dtype(input.dtype), input))


@torch.library.custom_op("crossent::cross_entropy_bwd", mutates_args=(), tags=_TAGS,
                         schema="(Tensor grad_output, " + _CE_SCHEMA[1:]
                         + " -> (Tensor, Tensor, Tensor)")
def _cross_entropy_bwd(grad_output, input, target, weight, num_items, requires, want_grads,
                       copy_input, size_average, ignore_index, reduce, reduction,
                       label_smoothing, z_loss, softcap, loss_dtype, num_items_value, backend,
                       autocast, statistics, formula):
    """The gradients of input, target and weight for ``grad_output``: the eager forward
    and backward, run again (for gradients forward does not store; no statistics)."""
    _, grads, _ = _run_eager(
        "cross_entropy", _ce_tensors(input, target, weight, num_items), requires,
        _ce_options(size_average, ignore_index, reduce, reduction, label_smoothing, z_loss,
                    softcap, loss_dtype, num_items_value, backend),
        autocast, grad_output, True)
    return (_or_empty(grads[0], input), _or_empty(grads[1], input),
            _or_empty(grads[2], input))


@_cross_entropy_bwd.register_fake
def _(grad_output, input, target, weight, num_items, requires, *rest):
    return (_or_empty(_fake_grad(input, requires[0]), input),
            _or_empty(_fake_grad(target, requires[1]), input),
            _or_empty(_fake_grad(weight, requires[2]), input))


@torch.library.custom_op("crossent::scale_stored_grad_cpu", mutates_args=(), tags=_TAGS,
                         schema="(Tensor grad, Tensor grad_output, Tensor target, "
                                "Scalar? ignore_index, bool smoothing, "
                                "Tensor? whole_rows) -> Tensor")
def _scale_stored_grad_cpu(grad, grad_output, target, ignore_index, smoothing, whole_rows):
    """The logits' gradient stored in forward (``grad_output = 1``) times ``grad_output``,
    on CPU (:func:`_scale_logits_grad`, contiguous as the fake). The logits are not read:
    torch's loss does not save them, and an in-place change of them must not fail
    backward (review H84). ``whole_rows``: :func:`_z_loss_whole_rows`, or None."""
    return _scale_logits_grad(grad, target, grad_output, ignore_index, smoothing,
                              whole_rows).contiguous()


@_scale_stored_grad_cpu.register_fake
def _(grad, *rest):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.custom_op("crossent::read_saved", mutates_args=(),
                         schema="(Tensor grad_output, Tensor?[] saved) -> Tensor")
def _read_saved(grad_output, saved):
    """``grad_output``, copied (an operator returns no alias of an input), in a backward
    graph that thereby reads ``saved``: inputs torch's own backward reads (the class
    weight, which ``nll_loss`` saves; a ``num_items`` tensor, which ``sum / n`` saves) but
    a backward that scales gradients stored in forward does not. AOTAutograd's
    partitioner saves only what the backward graph reads, so without this an in-place
    change of them before backward went unnoticed there (the forward-time gradient came
    back) where torch raises; read here, they are saved and their versions checked.
    Costs a copy of ``grad_output`` (one value, or one per row). No ``cudagraph_unsafe``
    tag: a copy on the grad's device."""
    del saved
    return grad_output.clone()


@_read_saved.register_fake
def _(grad_output, saved):
    return torch.empty_like(grad_output)


def _read_torch_saves(grad_output: torch.Tensor,
                      saved: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """:func:`_read_saved` where any of ``saved`` is a tensor, else ``grad_output``."""
    if all(t is None for t in saved):
        return grad_output
    return torch.ops.crossent.read_saved(grad_output, list(saved))


def _ce_setup(ctx, inputs, output) -> None:
    input, target, weight, num_items = inputs[:4]
    # ctx.options: requires, want_grads, and the options
    ctx.requires, ctx.want_grads, ctx.options = _run_time_requires(ctx, inputs, 4)
    ctx.mark_non_differentiable(*output[1:])
    ctx.grad_dtypes = [None if t is None else t.dtype for t in inputs[:3]]
    autocast = inputs[_CE_AUTOCAST]
    copied_weight = _autocast_copies_weight(weight, autocast)
    if ctx.want_grads:  # the gradient of the input, stored in forward; class indices for
        # the rows and entries a non-finite grad_output reaches (_scale_logits_grad); the
        # target (probabilities too), the class weight and a num_items tensor saved as
        # torch's kernel and its sum / n save them, so that an in-place change of any
        # before backward raises as there (their versions are checked when backward
        # unpacks them; read in backward, so that AOTAutograd saves them too:
        # crossent::read_saved); with z_loss on CPU the rows' lse (forward returns it)
        ctx.cpu = input.device.type == "cpu"
        named = dict(zip(_CE_OPTIONS, ctx.options[2:], strict=True))
        lse = (output[3 + _LSE],) if ctx.cpu and _wants_lse(named["z_loss"]) else ()
        ctx.save_for_backward(output[1], target, None if copied_weight else weight,
                              num_items, *lse)
    elif inputs[6]:  # copy_input: recomputed in backward from forward's copy of the
        # logits, which nothing else holds (float16: _recomputes_float16; target or weight
        # gradients), and of the weight where autocast copies it
        ctx.save_for_backward(output[1], target, output[2] if copied_weight else weight,
                              num_items)
    else:  # recomputed in backward (torch.export: a gradient the trace did not ask for,
        # _run_time_requires), from copies made here as forward's (review H109-2)
        ctx.save_for_backward(_contiguous_copy(input), target,
                              _weight_copy(weight, autocast, True) if copied_weight
                              else weight, num_items)


def _ce_backward(ctx, grad_loss, *_not_differentiable):
    _refuse_double_backward("cross_entropy")
    rest = (None,) * len(ctx.options)
    if ctx.want_grads:
        grad, target, weight, num_items, *lse = ctx.saved_tensors
        # weight and num_items: read (their versions checked), as torch's backward reads them
        grad_loss = _read_torch_saves(grad_loss, (weight, num_items))
        named = dict(zip(_CE_OPTIONS, ctx.options[2:], strict=True))
        smoothing = named["label_smoothing"] != 0
        if ctx.cpu:
            whole = _z_loss_whole_rows(lse[0], named["z_loss"]) if lse else None
            return (torch.ops.crossent.scale_stored_grad_cpu(
                grad, grad_loss, target, named["ignore_index"], smoothing, whole),
                None, None, None, *rest)
        return (_scale_logits_grad(grad, target, grad_loss, named["ignore_index"],
                                   smoothing),
                None, None, None, *rest)
    input, target, weight, num_items = ctx.saved_tensors
    requires = ctx.requires
    d_input, d_target, d_weight = _in_input_dtypes(torch.ops.crossent.cross_entropy_bwd(
        grad_loss, input, target, weight, num_items, *ctx.options), ctx.grad_dtypes, requires)
    return (d_input if requires[0] else None, d_target if requires[1] else None,
            d_weight if requires[2] else None, None, *rest)


_cross_entropy_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)

# the arguments after want_grads, by name; autocast's position among the inputs
_CE_OPTIONS = ("copy_input", "size_average", "ignore_index", "reduce", "reduction",
               "label_smoothing", "z_loss", "softcap", "loss_dtype", "num_items_value",
               "backend", "autocast", "statistics", "formula")
_CE_AUTOCAST = 6 + _CE_OPTIONS.index("autocast")


# ---- a grad_output other than 1, without host reads (the rules of _rules.scale_stored,
# _rules.nan_at_targets and _rules.infinite_as_nan as torch ops)


def _index_rows(target: torch.Tensor, ignore_index) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counted, index)`` of class-index targets: the rows torch scales (not
    ``ignore_index``; ``None`` is -100, as the entry points take it), and the target
    classes with 0 for the ignored rows (int64)."""
    ignore_index = -100 if ignore_index is None else ignore_index
    target = target.long()  # then compared, as _rules.check_index_target
    counted = target != ignore_index
    return counted, torch.where(counted, target, 0)


def _target_fits(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """The target's shape is one the loss takes for these logits (tracing meets any
    shapes; the forward operator raises crossent's error for the others when it runs)."""
    if logits.dim() == 0:
        return False
    if target.is_floating_point():  # (not read: the loss-shaped grad_output scales)
        return True
    return tuple(target.shape) == (tuple(logits.shape[:1]) + tuple(logits.shape[2:])
                                   if logits.dim() > 1 else ())


_LSE = TokenStatistics._fields.index("lse")  # its output after (loss, grad, weight copy)


def _wants_lse(z_loss) -> bool:
    """A z-loss: the compiled CPU backward needs the rows' lse (:func:`_z_loss_whole_rows`)."""
    return isinstance(z_loss, (int, float)) and z_loss != 0


def _z_loss_whole_rows(lse: torch.Tensor, z_loss: float) -> torch.Tensor:
    """The rows whose whole gradient an infinite ``grad_output`` makes NaN under a z-loss:
    torch's ``cross_entropy + z_loss * lse**2`` adds ``g * p_j`` and ``g * 2 z_loss lse
    p_j``, infinities of opposite signs (or ``inf * 0``) where ``z_loss * lse <= 0``
    (review H86-3). ``lse``: the loss's ``"none"`` shape."""
    return z_loss * lse <= 0


def _scale_logits_grad(grad: torch.Tensor, target: torch.Tensor, grad_output: torch.Tensor,
                       ignore_index, smoothing: bool,
                       whole_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The logits' gradient stored for ``grad_output = 1`` times ``grad_output`` (0-d, or
    the loss's shape for ``"none"``), as torch forms it for every ``grad_output``, with no
    host read: the rows torch leaves alone (ignored) times 0, not ``grad_output``
    (``NaN * 0`` would not stay 0); torch's ``inf - inf = NaN`` where an infinite
    ``grad_output`` meets an infinite ``dlogp``: the target entry of a counted row (index
    targets), every entry of the row (probability targets, label smoothing). One pass
    over ``N x C`` (the product, as before) and O(N) gathers and scatters. ``whole_rows``
    (the loss's ``"none"`` shape): rows treated as with smoothing (a z-loss's)."""
    # rounded to the loss's compute dtype first, as eager's backward and torch's
    # ToCopyBackward do (a float64 1e300 is inf for float32 logits)
    grad_output = grad_output.to(compute_dtype(grad.dtype))
    per_row = grad_output.unsqueeze(1) if grad_output.dim() > 0 else grad_output
    if not _target_fits(grad, target):  # forward raises when it runs: never reached
        return (grad * per_row).to(grad.dtype)
    every_row = target.is_floating_point() or smoothing
    factor = infinite_as_nan(grad_output) if every_row else grad_output
    if whole_rows is not None and not every_row:
        factor = torch.where(whole_rows, infinite_as_nan(grad_output), grad_output)
    counted = index = None
    if not target.is_floating_point():
        counted, index = _index_rows(target, ignore_index)
        factor = torch.where(counted, factor, 0.0)
    class_dim = 0 if grad.dim() == 1 else 1
    out = (grad * (factor.unsqueeze(1) if factor.dim() > 0 else factor)).to(grad.dtype)
    if every_row or grad.shape[class_dim] == 0:
        return out
    assert counted is not None and index is not None
    hit = (counted & grad_output.isinf()).unsqueeze(class_dim)
    index = index.unsqueeze(class_dim)
    # in place on the fresh product: an O(N) write, not a copy of N x C
    return out.scatter_(class_dim, index, torch.where(hit, torch.nan,
                                                      out.gather(class_dim, index)))


def _recomputes_float16(dtype: torch.dtype | None) -> bool:
    """Whether the compiled backward recomputes the gradients of ``dtype`` logits (or a
    head whose matmul runs in ``dtype``) with the real ``grad_output``, instead of scaling
    ones stored in forward for ``grad_output = 1``: float16's. Stored, they are rounded
    to float16 at unit scale, where every entry under 6.1e-5 (a softmax probability
    over ``N``: nearly all of an LLM batch's) is a subnormal or 0, and a ``GradScaler``'s
    scale multiplied afterwards cannot bring the lost digits back; eager crossent (which
    defers ``1/denominator``'s power of two) and torch (which scales first) keep them
    (review H105; figures in the module docstring). Recomputed, the
    gradients are eager's bitwise, for every route and reduction, at the cost of the
    forward run again in backward (forward then computes the loss alone)."""
    return dtype == torch.float16


def _contiguous_copy(t: torch.Tensor, dtype: torch.dtype | None = None,
                     fake: bool = False) -> torch.Tensor:
    """A copy of ``t`` (in ``dtype``) nothing else holds: an in-place change of the
    caller's logits after forward, which torch's loss allows (it saves its softmax, review
    H84), neither raises in backward nor changes its gradient. ``fake``: its shape and
    dtype only (the fake implementations)."""
    copy = torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)
    return copy if fake else copy.copy_(t)


def _weight_copy(weight: torch.Tensor | None, autocast: torch.dtype | None, wanted: bool,
                 fake: bool = False) -> torch.Tensor | None:
    """Autocast's float32 copy of the class weight where ``wanted`` (backward recomputes)
    and autocast makes one (:func:`_autocast_copies_weight`), else None."""
    if not (wanted and _autocast_copies_weight(weight, autocast)):
        return None
    assert weight is not None
    return _contiguous_copy(weight, torch.float32, fake)


def _in_input_dtypes(grads: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype | None],
                     requires: Sequence[bool]) -> list[torch.Tensor]:
    """The backward operator's gradients, those of copies (cast ones: autocast's, a
    class weight's float32 copy) back in their inputs' dtypes, as autocast's casts take
    them back."""
    return [g.to(d) if d is not None and r and g.dtype != d else g
            for g, d, r in zip(grads, dtypes, requires, strict=False)]


def _requires(*tensors: torch.Tensor | None) -> list[bool]:
    on = torch.is_grad_enabled()
    return [on and t is not None and t.requires_grad for t in tensors]


def _num_items_args(num_items):
    """``(tensor or None, number or None)``: a tensor travels as an operator input; an int
    past ``2**64`` as the float eager divides by (the operator's ``Scalar`` holds no
    more: ``OverflowError`` while tracing)."""
    if isinstance(num_items, torch.Tensor):
        return num_items, None
    if type(num_items) is int and not -(1 << 63) <= num_items < 1 << 64:
        return None, _checks.as_float(num_items)
    return None, num_items


def compiled_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    loss_dtype: torch.dtype | None = None,
    num_items: int | float | torch.Tensor | None = None,
    backend: str = "auto",
    statistics: str | tuple[str, ...] | None = None,
) -> Any:
    """:func:`crossent.torch.cross_entropy` under ``torch.compile``: one
    ``crossent::cross_entropy_fwd`` operator (see the module docstring for the rules;
    ``inplace_backward`` is ignored)."""
    problem = _type_problem("cross_entropy", (
        ("inplace_backward", inplace_backward, _BOOL),
        ("input", input, _TENSOR), ("target", target, _TENSOR),
        ("weight", weight, _OPTIONAL_TENSOR), ("ignore_index", ignore_index, _OPTIONAL_NUMBER),
        ("reduction", reduction, _TEXT), ("label_smoothing", label_smoothing, _NUMBER),
        ("z_loss", z_loss, _NUMBER), ("softcap", softcap, _OPTIONAL_NUMBER),
        ("loss_dtype", loss_dtype, _DTYPE), ("num_items", num_items, _COUNT),
        ("backend", backend, _TEXT)))
    del inplace_backward  # an operator may not mutate its inputs: the logits stay intact
    names, problem = _statistics_arg("cross_entropy", statistics) if problem is None \
        else (None, problem)
    if problem is not None:
        return _deferred_error(input, problem, statistics)
    # torch's legacy rule reads the values' truth (0 and tensor(False) are False)
    size_average, reduce = (legacy_flag(v, n) for v, n in ((size_average, "size_average"),
                                                           (reduce, "reduce")))
    device_type = input.device.type
    out_dtype = choose_loss_dtype(loss_dtype, input, target, weight)  # the eager entry's
    autocast = (torch.get_autocast_dtype(device_type)
                if torch.is_autocast_enabled(device_type) else None)
    tensor_count, number = _num_items_args(num_items)
    requires = _requires(input, target, weight, tensor_count)
    # the input's gradient is stored in forward unless target or weight need theirs, or
    # it is float16's; else backward recomputes, from a copy of the logits (torch's loss
    # saves its log-softmax: an in-place change of the logits after forward changes nothing)
    want_grads = (requires[0] and not (requires[1] or requires[2])
                  and not _recomputes_float16(input.dtype))
    copy_input = any(requires[:3]) and not want_grads
    # a z-loss on CPU: the rows' lse too, for backward (_z_loss_whole_rows)
    op_names = (",".join(dict.fromkeys((*_names(names or ""), "lse")))
                if want_grads and device_type == "cpu" and _wants_lse(z_loss) else names)
    loss, _, _, *stats = torch.ops.crossent.cross_entropy_fwd(
        input, target, weight, tensor_count, requires, want_grads, copy_input, size_average,
        ignore_index, reduce, reduction, label_smoothing, z_loss, softcap, out_dtype, number,
        backend, autocast, op_names, FORMULA)
    return _with_statistics(loss, names, stats)


# ---- linear_cross_entropy

_LINEAR_TENSORS = ("input", "linear_weight", "linear_bias", "target", "weight", "num_items")
_LINEAR_SCHEMA = (
    "(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor? weight, "
    "Tensor? num_items, bool[] requires, bool want_grads, bool copy_inputs, str reduction, "
    "Scalar? ignore_index, "
    "Scalar label_smoothing, Scalar z_loss, Scalar? softcap, Scalar? chunk_size, "
    "str? options_type, Scalar? batch_chunk_size, str? chunking_method, str? acc_policy, "
    "ScalarType? acc_dtype, bool allow_retain_graph, ScalarType loss_dtype, "
    "Scalar? num_items_value, str backend, Scalar shift, ScalarType? autocast, "
    "str? statistics, str formula)")
# the arguments after want_grads, by name
_LINEAR_OPTIONS = ("copy_inputs", "reduction", "ignore_index", "label_smoothing", "z_loss",
                   "softcap", "chunk_size", "options_type", "batch_chunk_size",
                   "chunking_method", "acc_policy", "acc_dtype", "allow_retain_graph",
                   "loss_dtype", "num_items_value", "backend", "shift", "autocast",
                   "statistics", "formula")
_LINEAR_AUTOCAST = 8 + _LINEAR_OPTIONS.index("autocast")  # its position among the inputs


class _Options:
    """``torch.nn.LinearCrossEntropyOptions``'s fields, rebuilt inside the operator
    (an operator takes no Python objects)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def _linear_options(copy_inputs, reduction, ignore_index, label_smoothing, z_loss, softcap,
                    chunk_size, options_type, batch_chunk_size, chunking_method, acc_policy,
                    acc_dtype, allow_retain_graph, loss_dtype, num_items_value, backend, shift,
                    autocast, statistics, formula) -> dict[str, Any]:
    """The eager function's keyword arguments (``copy_inputs``: the operators'; ``autocast``,
    ``statistics``: passed separately; ``formula``: for the compile caches only)."""
    options: Any = None
    if options_type == "":  # not options: the eager check names its type
        options = type("options", (), {})()
    elif options_type is not None:
        options = _Options(batch_chunk_size=batch_chunk_size, chunking_method=chunking_method,
                           acc_policy=acc_policy, acc_dtype=acc_dtype,
                           allow_retain_graph=allow_retain_graph)
    out = dict(reduction=reduction, ignore_index=ignore_index,
               label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
               chunk_size=chunk_size, options=options, loss_dtype=loss_dtype,
               backend=backend, shift=shift)
    if num_items_value is not None:
        out["num_items"] = num_items_value
    return out


def _linear_tensors(*tensors) -> dict[str, torch.Tensor | None]:
    return dict(zip(_LINEAR_TENSORS, tensors, strict=True))


@torch.library.custom_op("crossent::linear_cross_entropy_fwd", mutates_args=(), tags=_TAGS,
                         schema=_LINEAR_SCHEMA
                         + f" -> (Tensor, Tensor, Tensor, Tensor, Tensor, {_STATS_RETURNS})")
def _linear_fwd(input, linear_weight, linear_bias, target, weight, num_items, requires,
                want_grads, *options):
    """The loss; with ``want_grads`` ``dx``, ``dW``, ``db`` for ``grad_output = 1``, with
    ``copy_inputs`` the copies of x, W, b backward recomputes from in their place
    (:func:`_head_copies`); the float32 copy of the class weight autocast makes, where
    backward recomputes from it (:func:`_autocast_copies_weight`); and the statistics
    asked for."""
    named = dict(zip(_LINEAR_OPTIONS, options, strict=True))
    loss, grads, stats = _run_eager(
        "linear_cross_entropy",
        _linear_tensors(input, linear_weight, linear_bias, target, weight, num_items),
        _forward_requires(requires, want_grads, 3), _linear_options(*options),
        named["autocast"], None, want_grads,
        named["statistics"])
    grads_or_copies = (
        _head_copies(input, linear_weight, linear_bias, named["autocast"], requires[1])
        if named["copy_inputs"] else grads[:3])
    weight_copy = _weight_copy(weight, named["autocast"], not want_grads)
    return (loss, *(_or_empty(g, input) for g in grads_or_copies),
            _or_empty(weight_copy, input), *_stats_outputs(stats, input))


def _head_copy_dtypes(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                      autocast: torch.dtype | None,
                      weight_grad: bool) -> list[torch.dtype | None]:
    """The dtypes of the copies of ``x``, ``W``, ``b`` a float16 head's recompute keeps
    (:func:`_recomputes_float16`), or None where it keeps the input itself. Kept as torch's
    unfused head keeps them, so that an in-place change after forward raises where torch's
    raises: ``F.linear`` saves ``x`` where ``W`` needs a gradient (kept itself; copied
    otherwise, ``N x D``, review H109-1) and ``W`` (kept itself: a parameter, ``V x D``; a
    change of it raises also where ``x`` needs no gradient and torch saves no ``W``, a loud
    refusal), never the bias (copied); under autocast it saves its casts, so a change of
    the float32 master weights is not seen (review H106-1, H87-2): the casts are kept."""
    x_dtype, w_dtype = linear_cast_dtype(x, autocast), linear_cast_dtype(w, autocast)
    return [None if x_dtype == x.dtype and weight_grad else x_dtype,
            None if w_dtype == w.dtype else w_dtype,
            None if b is None else linear_cast_dtype(b, autocast)]


def _head_copies(x, w, b, autocast, weight_grad: bool,
                 fake: bool = False) -> list[torch.Tensor | None]:
    """The copies :func:`_head_copy_dtypes` names (None where the input is kept)."""
    out: list[torch.Tensor | None] = []
    for t, dtype in zip((x, w, b), _head_copy_dtypes(x, w, b, autocast, weight_grad),
                        strict=True):
        out.append(None if dtype is None else _contiguous_copy(t, dtype, fake))
    return out


def _linear_loss_shape(input, linear_weight, target, reduction, shift) -> tuple:
    if reduction != "none":
        return ()
    if shift is True:  # (B, T - 1) or (T - 1)
        return (*target.shape[:-1], target.shape[-1] - 1)
    if input.dim() < 2:
        return ()
    return (input.shape[0], *linear_weight.shape[1:-1])


@_linear_fwd.register_fake
def _(input, linear_weight, linear_bias, target, weight, num_items, requires, want_grads,
      *options):
    named = dict(zip(_LINEAR_OPTIONS, options, strict=True))
    shift = named["shift"]
    loss = input.new_empty(
        _linear_loss_shape(input, linear_weight, target, named["reduction"], shift),
        dtype=named["loss_dtype"])
    grads = ([_or_empty(c, input) for c in _head_copies(
        input, linear_weight, linear_bias, named["autocast"], requires[1], fake=True)]
        if named["copy_inputs"] else
        [_or_empty(_fake_grad(t, want_grads and r), input)
         for t, r in zip((input, linear_weight, linear_bias), requires, strict=False)])
    stats = _fake_stats(named["statistics"],
                        _linear_loss_shape(input, linear_weight, target, "none", shift),
                        compute_dtype(input.dtype), input)
    weight_copy = _weight_copy(weight, named["autocast"], not want_grads, fake=True)
    return (loss, *grads, _or_empty(weight_copy, input), *stats)


@torch.library.custom_op("crossent::linear_cross_entropy_bwd", mutates_args=(), tags=_TAGS,
                         schema="(Tensor grad_output, " + _LINEAR_SCHEMA[1:]
                         + " -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _linear_bwd(grad_output, input, linear_weight, linear_bias, target, weight, num_items,
                requires, want_grads, *options):
    """The gradients of x, W, b, target and weight for ``grad_output``: the eager forward
    and backward run again (``reduction="none"`` scales each row in float32, as eager)."""
    _, grads, _ = _run_eager(
        "linear_cross_entropy",
        _linear_tensors(input, linear_weight, linear_bias, target, weight, num_items),
        requires, _linear_options(*options), options[_LINEAR_OPTIONS.index("autocast")],
        grad_output, True)
    return tuple(_or_empty(g, input) for g in grads[:5])


@_linear_bwd.register_fake
def _(grad_output, input, linear_weight, linear_bias, target, weight, num_items, requires,
      *rest):
    return tuple(_or_empty(_fake_grad(t, r), input) for t, r in zip(
        (input, linear_weight, linear_bias, target, weight), requires, strict=False))


def _linear_setup(ctx, inputs, output) -> None:
    ctx.requires, ctx.want_grads, ctx.inputs_rest = _run_time_requires(ctx, inputs, 6)
    ctx.mark_non_differentiable(*output[1:])
    autocast = inputs[_LINEAR_AUTOCAST]
    copied_weight = _autocast_copies_weight(inputs[4], autocast)
    ctx.grad_dtypes = [None if t is None else t.dtype for t in inputs[:5]]
    if ctx.want_grads:  # mean/sum: dx, dW, db stored in forward; the shapes and the
        # target: the rows a non-finite grad_output reaches (neither x nor W is kept;
        # float16 heads are recomputed: _recomputes_float16)
        ctx.x_shape, ctx.w_shape = inputs[0].shape, inputs[1].shape
        # and the class weight and a num_items tensor, for their versions (_read_saved;
        # not a weight autocast copies, whose copy torch saves); not x and W, which
        # torch's F.linear saves: an intermediate W (W0 * 2, a dequantized head) would
        # be kept alive for backward (review B6 of ac32687)
        ctx.save_for_backward(*output[1:4], inputs[3], None if copied_weight else inputs[4],
                              inputs[5])
    else:  # recomputed in backward from the inputs, with the real grad_output (a float16
        # head's from the copies forward made: _head_copy_dtypes)
        saved = list(inputs[:6])
        if inputs[8]:  # copy_inputs
            kept = _head_copy_dtypes(inputs[0], inputs[1], inputs[2], autocast, inputs[6][1])
            for i, dtype in enumerate(kept):
                if dtype is not None:
                    saved[i] = output[1 + i]
        if copied_weight:  # autocast's float32 copy: forward's, or (torch.export run with
            # a gradient the trace did not ask for) made here
            saved[4] = output[4] if not inputs[7] else _weight_copy(inputs[4], autocast, True)
        ctx.save_for_backward(*saved)


def _linear_backward(ctx, grad_loss, *_grad_grads):
    _refuse_double_backward("linear_cross_entropy")
    rest = (None,) * len(ctx.inputs_rest)
    requires = ctx.requires
    if ctx.want_grads:
        dx, dw, db, target, *read = ctx.saved_tensors
        grad_loss = _read_torch_saves(grad_loss, read)
        named = dict(zip(_LINEAR_OPTIONS, ctx.inputs_rest[2:], strict=True))
        grads = _scale_head_grads((dx, dw, db), requires[:3], ctx.x_shape, ctx.w_shape,
                                  target, grad_loss, named)
        return (*grads, None, None, None, *rest)
    found = _in_input_dtypes(torch.ops.crossent.linear_cross_entropy_bwd(
        grad_loss, *ctx.saved_tensors, *ctx.inputs_rest), ctx.grad_dtypes, requires)
    return (*(g if r else None for g, r in zip(found, requires, strict=False)), None,
            *rest)


_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


def _head_rows(x_shape: Sequence[int], w_shape: Sequence[int], target: torch.Tensor,
               named: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(counted, index)`` of the head's loss rows, as the eager head forms them: per
    row of ``x`` (of shape ``x_shape``: ``(N, D)``; ``shift=True``: ``(B, T, D)``, row
    ``b T + t``; ``(D)``: one row) and logit position (``P``: the product of a
    K-dimensional linear weight's ``d1 ... dK``, of shape ``w_shape``, else 1), the
    ``(N, P)`` mask of counted targets and their classes (0 where ignored; ``None`` for
    probability targets, every row counted)."""
    ignore_index = -100 if named["ignore_index"] is None else named["ignore_index"]
    if named["shift"] is True:  # position t scored against target t + 1; the last ignored
        target = target.long()
        target = torch.cat([target[..., 1:], torch.full_like(target[..., :1], ignore_index)],
                           -1)
    rows, positions = math.prod(x_shape[:-1]), math.prod(w_shape[1:-1])
    if target.is_floating_point():
        return torch.ones((rows, positions), dtype=torch.bool, device=target.device), None
    return _index_rows(target.reshape(rows, positions), ignore_index)


def _head_fits(x_shape: Sequence[int], w_shape: Sequence[int], target: torch.Tensor,
               shift) -> bool:
    """Shapes the head takes (as :func:`_target_fits`: tracing meets any shapes)."""
    if len(w_shape) < 2 or tuple(x_shape[-1:]) != tuple(w_shape[-1:]):
        return False
    if shift is True:
        return (len(x_shape) in (2, 3) and len(w_shape) == 2
                and not target.is_floating_point()
                and tuple(target.shape) == tuple(x_shape[:-1]))
    if len(x_shape) not in (1, 2):
        return False
    classes = tuple(w_shape[:-1] if target.is_floating_point() else w_shape[1:-1])
    return tuple(target.shape) == tuple(x_shape[:-1]) + classes


def _scale_head_grads(stored: Sequence[torch.Tensor], requires: Sequence[bool],
                      x_shape: Sequence[int], w_shape: Sequence[int], target: torch.Tensor,
                      grad_output: torch.Tensor,
                      named: dict[str, Any]) -> list[torch.Tensor | None]:
    """``dx``, ``dW``, ``db`` stored for ``grad_output = 1`` times the 0-d ``grad_output``
    (``"mean"``/``"sum"``), each product in the loss's compute dtype and rounded once (a
    GradScaler's 65536 is inf in float16), with no host read. ``dx`` as torch forms it
    for every ``grad_output``: ignored rows 0 (torch forms nothing there), counted rows
    NaN for a NaN or infinite one (their ``dlogits`` hold ``inf - inf``). ``dW``/``db`` 0
    where no row counts; otherwise the stored ones times ``grad_output``: for an infinite
    one ``+-inf`` where torch's sums of infinities hold NaN in places (see the module
    docstring)."""
    dx, dw, db = stored  # each of x's dtype (an empty one where not asked for)
    grad_output = grad_output.to(compute_dtype(dx.dtype))  # rounded first, as eager's
    if not _head_fits(x_shape, w_shape, target, named["shift"]):
        # the forward operator raises crossent's error when it runs: never reached
        return [(g * grad_output).to(g.dtype) if r else None
                for g, r in zip(stored, requires, strict=True)]
    counted, index = _head_rows(x_shape, w_shape, target, named)
    out: list[torch.Tensor | None] = [None, None, None]
    if requires[0]:
        factor = torch.where(counted.any(1), infinite_as_nan(grad_output), 0.0)
        out[0] = (dx * factor.reshape(*dx.shape[:-1], 1)).to(dx.dtype)
    # probability targets, label smoothing: every class's dlogits holds inf - inf, so
    # torch's dW/db are all NaN; index targets: see above (not followed)
    whole_rows = index is None or named["label_smoothing"] != 0
    # per logit position (K-dimensional weights): 0 where no row counts there
    positions = tuple(w_shape[1:-1])
    factor = torch.where(counted.any(0), infinite_as_nan(grad_output) if whole_rows
                         else grad_output, 0.0).reshape(1, *positions)
    for k, g in ((1, dw), (2, db)):
        if requires[k]:
            out[k] = (g * (factor.unsqueeze(-1) if k == 1 else factor)).to(g.dtype)
    return out


def _options_fields(options) -> tuple:
    """``(type name or None, batch_chunk_size, chunking_method, acc_policy, acc_dtype,
    allow_retain_graph)``; the type name ``""`` for an object that is not options."""
    if options is None:
        return None, None, None, None, None, False
    fields = ("batch_chunk_size", "chunking_method", "acc_policy", "acc_dtype",
              "allow_retain_graph")
    # (dynamo cannot trace hasattr on a bare object(): refused by type first)
    if type(options) is object or not all(hasattr(options, f) for f in fields):
        return "", None, None, None, None, False
    return (type(options).__name__, options.batch_chunk_size, options.chunking_method,
            options.acc_policy, options.acc_dtype, bool(options.allow_retain_graph))


def _linear_loss_dtype(x: torch.Tensor, target: torch.Tensor, weight, loss_dtype
                       ) -> torch.dtype:
    """The eager head's loss dtype: autocast casts ``x`` to its dtype (float64 stays),
    then a low-precision ``x`` gives a float32 loss; a probability ``target`` and its
    class ``weight`` promote it (:func:`._rules.choose_loss_dtype`)."""
    if loss_dtype is not None:
        return loss_dtype
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type) or x.dtype == torch.float64:
        return promote_with_target(x.dtype, target, weight)
    cast = torch.get_autocast_dtype(device_type)
    return promote_with_target(torch.float32 if cast in LOW_PRECISION else cast, target,
                               weight)


def compiled_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    options=None,
    loss_dtype: torch.dtype | None = None,
    num_items: int | float | torch.Tensor | None = None,
    backend: str = "auto",
    shift: bool = False,
    statistics: str | tuple[str, ...] | None = None,
) -> Any:
    """:func:`crossent.torch.linear_cross_entropy` under ``torch.compile``: one
    ``crossent::linear_cross_entropy_fwd`` operator (see the module docstring)."""
    problem = _type_problem("linear_cross_entropy", (
        ("input", input, _TENSOR), ("linear_weight", linear_weight, _TENSOR),
        ("target", target, _TENSOR), ("linear_bias", linear_bias, _OPTIONAL_TENSOR),
        ("weight", weight, _OPTIONAL_TENSOR), ("reduction", reduction, _TEXT),
        ("ignore_index", ignore_index, _OPTIONAL_NUMBER),
        ("label_smoothing", label_smoothing, _NUMBER), ("z_loss", z_loss, _NUMBER),
        ("softcap", softcap, _OPTIONAL_NUMBER), ("chunk_size", chunk_size, _OPTIONAL_NUMBER),
        ("loss_dtype", loss_dtype, _DTYPE), ("num_items", num_items, _COUNT),
        ("backend", backend, _TEXT), ("shift", shift, _FLAG)))
    names, problem = _statistics_arg("linear_cross_entropy", statistics) \
        if problem is None else (None, problem)
    if problem is not None:
        return _deferred_error(input, problem, statistics)
    device_type = input.device.type
    autocast = (torch.get_autocast_dtype(device_type)
                if torch.is_autocast_enabled(device_type) else None)
    tensor_count, number = _num_items_args(num_items)
    requires = _requires(input, linear_weight, linear_bias, target, weight, tensor_count)
    # dx, dW, db are stored in forward for "mean"/"sum"; "none" (each row's grad_output
    # enters dW), target/weight gradients and float16 heads (float16 where the gradients
    # are stored, the inputs' dtypes, or computed, autocast's casts; not float64, which
    # autocast leaves) are computed in backward, the last from copies (_head_copy_dtypes)
    direct = any(requires[:3]) and not (requires[3] or requires[4])
    copy_inputs = direct and any(_recomputes_float16(d) for t in (input, linear_weight)
                                 for d in (t.dtype, linear_cast_dtype(t, autocast)))
    want_grads = direct and reduction != "none" and not copy_inputs
    loss, _, _, _, _, *stats = torch.ops.crossent.linear_cross_entropy_fwd(
        input, linear_weight, linear_bias, target, weight, tensor_count, requires,
        want_grads, copy_inputs, reduction, ignore_index, label_smoothing, z_loss, softcap,
        chunk_size, *_options_fields(options),
        _linear_loss_dtype(input, target, weight, loss_dtype), number, backend, shift,
        autocast, names, FORMULA)
    return _with_statistics(loss, names, stats)


_COMPILED: dict[str, Callable[..., Any]] = {
    "cross_entropy": compiled_cross_entropy,
    "linear_cross_entropy": compiled_linear_cross_entropy,
}
