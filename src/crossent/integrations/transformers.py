"""Hugging Face transformers: a causal LM's training loss without its logits.

``patch(model)`` makes a causal-LM model compute its training loss with
:func:`crossent.torch.linear_cross_entropy` straight from the last hidden states and the
LM head's weight, so the ``(batch * seq, vocab)`` logits (and their float32 copy and their
gradient) are never built: at a 128k vocabulary that is the largest tensor of a training step.
(Below ``2**19`` logits ``linear_cross_entropy`` makes them in one matmul, which is faster
at that size; ``patch(model, chunk_size=...)`` always chunks.) The idea of patching the
model's forward is Liger Kernel's (Hsu et al. 2024, arXiv:2410.10989); the code is crossent's.

>>> import torch, transformers
>>> from crossent.integrations.transformers import patch
>>> config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
>>> model = patch(transformers.LlamaForCausalLM(config)).train()
>>> ids = torch.tensor([[1, 5, 7, 9]])
>>> out = model(input_ids=ids, labels=ids)
>>> out.logits is None, out.loss.shape
(True, torch.Size([]))

What stays as it was: a call without ``labels`` (generation, inference) and, by default,
any call in ``eval()`` mode (the Trainer's evaluation reads the logits) run the model's own
``forward``. With labels in training mode the patched forward runs the same base model
with the same arguments and computes, as transformers' ``ForCausalLMLoss`` does,

``loss = sum_n [label_n != -100] (lse(z_n) - z_n,label_n) / D``, ``z_n = softcap(h_n W^T + b)``

with labels shifted left by one inside each sequence (or the caller's ``shift_labels``),
``D`` the number of counted tokens or the Trainer's ``num_items_in_batch``, and Gemma's
``final_logit_softcapping`` as ``softcap`` (Gemma 2/3 only: the other families ignore
that attribute; its magnitude, as transformers' ``c tanh(z / c)`` is the same for ``-c``;
0 is refused). The output is the model's ``CausalLMOutputWithPast`` with ``logits=None``;
with ``return_dict=False`` the tuple keeps the logits' place: ``(loss, None, cache, ...)``.
Labels of any integer dtype are accepted (int32, uint8: transformers raises for them);
floating or bool labels, or a count that does not match the positions, raise
:class:`crossent.InputError` naming ``labels``. Tied embeddings need nothing special: the
head's weight is the embedding's, and its gradient reaches it.

Supported classes: :data:`SUPPORTED_CLASSES` (and subclasses that keep their ``forward``).
Anything the fused path could not reproduce raises :class:`crossent.UnsupportedError`
(another model class, a custom ``loss_function``/``loss_type``, an LM head that is not a
plain ``torch.nn.Linear`` or carries hooks (forward or backward, also torch's global module
hooks: the fused loss skips the head's forward and backward), a sharded (DTensor) head, a
head whose rows do not match ``config.vocab_size``).

The loss is float32 for every model dtype, as transformers' (it upcasts the logits with
``.float()``); for a bfloat16 model it equals the unpatched loss, both computed in float32 from
the same bfloat16 logits (with the default ``chunk_size``: a set one sums the loss chunk by
chunk, within a float32 ulp of it). Differences that remain: Gemma 2/3's softcap is applied
in float32 to the bfloat16 logits, where transformers rounds ``z / c``, ``tanh`` and ``c tanh`` to
bfloat16 (about ``2**-8`` relative per logit; crossent's is the more accurate); a float64
model's loss is computed in float64 before the rounding to float32.

The patch is part of the instance: ``copy.deepcopy`` and ``pickle``/``torch.save`` keep it
(bound to the copy; loading needs crossent), ``state_dict``, ``save_pretrained`` and the
config are unchanged (``from_pretrained`` gives an unpatched model). ``copy.copy`` and
``torch.nn.DataParallel`` replicas share the instance's ``__dict__`` and so call the
patched forward of the original instance: patch the class (``patch(type(model))``) there.
"""

from __future__ import annotations

import importlib
import inspect
import math
import types
from collections.abc import Callable
from typing import Any, cast

# a missing torch is named with the extra that brings it, and keeps name='torch' (as in
# crossent.torch); transformers itself is imported only when a model is patched
from ..errors import InputError, UnsupportedError, missing_extra

try:
    import torch
except ModuleNotFoundError as err:
    missing_extra(err, "torch", "crossent.integrations.transformers needs PyTorch: "
                                "pip install 'crossent[hf]'")
from ..torch import linear_cross_entropy

__all__ = ["SUPPORTED_CLASSES", "causal_lm_loss", "is_patched", "patch", "unpatch"]

SUPPORTED_CLASSES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)
"""transformers classes whose ``forward`` is ``base model -> lm_head -> (softcap) -> loss``,
checked against transformers 5.x and tested in ``tests/integrations``."""

_SOFTCAPPED = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
"""The classes whose ``forward`` applies ``config.final_logit_softcapping`` (the others
ignore the attribute, even where a config carries it)."""

_ORIGINAL = "__crossent_original_forward__"
_IGNORE_INDEX = -100


def _transformers() -> Any:
    # imported here (and through importlib, so that mypy does not type-check transformers):
    # crossent itself never needs it
    try:
        return importlib.import_module("transformers")
    except ModuleNotFoundError as e:  # pragma: no cover - the hf extra is missing
        if e.name != "transformers":  # transformers is there but broken: its own error
            raise
        raise ModuleNotFoundError("crossent.integrations.transformers needs transformers: "
                                  "pip install 'crossent[hf]'", name="transformers") from None


_HF: dict[str, Any] = {}
"""transformers' objects the patched forward needs, imported once by :func:`_hf` (at
``patch`` time: an import inside the forward would break ``torch.compile``'s graph)."""


def _hf() -> dict[str, Any]:
    """``ForCausalLMLoss``, ``CausalLMOutputWithPast`` and ``slice_logits_to_keep`` (None
    before transformers 5), imported on first use."""
    if not _HF:
        transformers = _transformers()  # first: a missing hf extra is named
        modeling_utils = importlib.import_module("transformers.modeling_utils")
        _HF.update(
            loss=importlib.import_module("transformers.loss.loss_utils").ForCausalLMLoss,
            output=transformers.modeling_outputs.CausalLMOutputWithPast,
            slicer=getattr(modeling_utils, "slice_logits_to_keep", None))
    return _HF


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor | None,
    lm_head_bias: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = _IGNORE_INDEX,
    softcap: float | None = None,
    chunk_size: int | None = None,
    loss_dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss(lm_head(hidden_states), labels)`` without the logits.

    Formula: ``sum_n [t_n != ignore_index] (lse(z_n) - z_n,t_n) / D`` with
    ``z_n = softcap(h_n W^T + b)`` (``c tanh(z / c)``), ``t`` the labels shifted left by one
    within each sequence (the last position of each sequence is ignored) or ``shift_labels``
    as given, and ``D`` the number of non-ignored ``t_n`` or ``num_items_in_batch`` (the
    Trainer's token count over all accumulated micro-batches, which makes gradient
    accumulation equal the full batch).

    Shapes: ``hidden_states (B, T, H)`` (or any ``(..., H)`` with as many rows as
    ``labels`` has elements), weight ``(V, H)``, bias ``(V)`` or None, ``labels`` /
    ``shift_labels`` ``(B, T)`` integer (any integer dtype; bool and floating raise).
    Reduction: mean over counted tokens (NaN when none is counted, as in transformers) or
    sum / ``num_items_in_batch`` (0 / 0 = NaN likewise). ``loss_dtype``: float32 by default,
    as transformers' (it upcasts the logits); ``None`` keeps the hidden states' dtype.

    Reference: ``transformers.loss.loss_utils.ForCausalLMLoss`` on ``lm_head(hidden)``.

    >>> import torch
    >>> h, w = torch.zeros(1, 3, 4), torch.zeros(5, 4)
    >>> round(causal_lm_loss(h, w, torch.tensor([[0, 1, 2]])).item(), 6)  # ln 5
    1.609438
    """
    if shift_labels is None:
        if labels is None:
            raise InputError("labels: give labels or shift_labels")
        # position t predicts label t+1; the last position of each sequence predicts nothing
        # (int64 first: a uint8 label tensor cannot hold the -100 padding)
        shift_labels = torch.nn.functional.pad(_index_labels(labels, "labels").long(), (0, 1),
                                               value=ignore_index)[..., 1:]
    else:
        _index_labels(shift_labels, "shift_labels")
    features = hidden_states.shape[-1]
    x = hidden_states.reshape(-1, features)
    if shift_labels.numel() != x.shape[0]:
        raise InputError(
            f"labels: {tuple(shift_labels.shape)} labels for {x.shape[0]} positions of "
            f"hidden states {tuple(hidden_states.shape)}; give one label per position")
    target = shift_labels.reshape(-1).to(x.device)
    common: dict[str, Any] = {"ignore_index": ignore_index, "softcap": softcap,
                               "chunk_size": chunk_size, "loss_dtype": loss_dtype}
    if num_items_in_batch is None:
        return cast(torch.Tensor, linear_cross_entropy(  # no statistics: a tensor
            x, lm_head_weight, target, lm_head_bias, reduction="mean", **common))
    # The one place where the Trainer's denominator is applied; not crossent.torch's
    # ``num_items=``, which refuses a count of 0 (transformers gives 0 / 0 = NaN).
    total = cast(torch.Tensor, linear_cross_entropy(
        x, lm_head_weight, target, lm_head_bias, reduction="sum", **common))
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _index_labels(labels: Any, name: str) -> torch.Tensor:
    """``labels`` if it is a tensor of class indices, else InputError naming ``name``."""
    if not isinstance(labels, torch.Tensor):
        raise InputError(f"{name} must be a tensor of token ids, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise InputError(f"{name} must hold integer token ids (and -100 for ignored "
                         f"positions), got {labels.dtype}")
    return labels


def _supported_base(cls: type) -> Any:
    for klass in cls.__mro__:
        if (klass.__name__ in SUPPORTED_CLASSES
                and klass.__module__.startswith("transformers.models.")):
            return klass
    return None


def _unwrapped(forward: Callable[..., Any]) -> Callable[..., Any]:
    return getattr(forward, _ORIGINAL, forward)


def _check_class(cls: Any) -> Any:
    """The supported transformers class ``cls`` derives from, or UnsupportedError."""
    base = _supported_base(cls)
    if base is None:
        raise UnsupportedError(
            f"crossent.integrations.transformers.patch: model class {cls.__name__} is not "
            f"supported (supported: {', '.join(SUPPORTED_CLASSES)})")
    if _unwrapped(cls.forward) is not _unwrapped(base.forward):
        raise UnsupportedError(
            f"crossent.integrations.transformers.patch: {cls.__name__} overrides "
            f"{base.__name__}.forward; a custom forward is not supported")
    return base


def _head_hooks(head: torch.nn.Module) -> bool:
    """Whether a hook would see the head's forward or backward, which the fused loss skips."""
    own = (head._forward_hooks, head._forward_pre_hooks, head._backward_hooks,
           head._backward_pre_hooks)
    module_hooks = torch.nn.modules.module
    everyone = (module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks,
                module_hooks._global_backward_hooks, module_hooks._global_backward_pre_hooks)
    return any(own) or any(everyone) or hasattr(head, "_hf_hook")


def _check_model(model: Any) -> Any:
    """The LM head (an ``nn.Linear``) if the fused path reproduces ``model``'s loss."""
    if model.loss_function is not _hf()["loss"]:
        raise UnsupportedError(
            "crossent.integrations.transformers: a custom loss_function or loss_type "
            f"({getattr(model, 'loss_type', None)!r}) is not supported; only ForCausalLM")
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise UnsupportedError(
            f"crossent.integrations.transformers: LM head of type {type(head).__name__} "
            f"is not supported (a plain torch.nn.Linear is)")
    if _head_hooks(head):
        raise UnsupportedError(
            "crossent.integrations.transformers: an LM head with hooks (forward or backward, "
            "its own or torch's global module hooks: offloading, FSDP, adapters, profilers) "
            "is not supported: the fused loss skips its forward and backward")
    vocab = getattr(model.config, "vocab_size", None)
    if head.weight.shape[0] != vocab:
        raise UnsupportedError(
            f"crossent.integrations.transformers: the LM head has {head.weight.shape[0]} rows "
            f"but config.vocab_size is {vocab}; transformers' loss assumes they agree")
    if type(head.weight.data).__name__ == "DTensor":
        raise UnsupportedError(
            "crossent.integrations.transformers: a sharded (DTensor) LM head is not supported; "
            "use crossent.torch.distributed for vocabulary-parallel heads")
    return head


def _slice_logits_to_keep(hidden: torch.Tensor, logits_to_keep: Any) -> torch.Tensor:
    slicer = _hf()["slicer"]
    if slicer is not None:
        return slicer(hidden, logits_to_keep)
    # transformers < 5: an int keeps the last positions, a 1-D tensor indexes them
    index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden[:, index, :]


class _FusedForward:
    """The patched ``forward``: the original one without ``labels`` (or in ``eval()`` mode),
    :func:`_training_forward` with them.

    An instance patch stores one bound to its model in the instance's ``__dict__``; a class
    patch stores an unbound one on the class, where it binds like a function (a descriptor).
    Unlike a bound method of a closure it survives ``pickle`` and ``copy.deepcopy``, rebound
    to the copy, and it keeps the original's signature (the Trainer reads it to pass
    ``num_items_in_batch``)."""

    def __init__(self, original: Callable[..., Any], in_eval: bool, chunk_size: int | None,
                 model: Any = None, owner: type | None = None) -> None:
        setattr(self, _ORIGINAL, original)
        self.in_eval, self.chunk_size, self.model, self.owner = in_eval, chunk_size, model, owner
        signature = inspect.signature(original)
        self.bind = signature.bind
        self.var_keyword = next((p.name for p in signature.parameters.values()
                                 if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        if model is not None:  # bound: no ``self`` parameter
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        self.__signature__ = signature
        self.__name__ = getattr(original, "__name__", "forward")
        self.__doc__ = getattr(original, "__doc__", None)

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        return self if instance is None else types.MethodType(self, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        if model is None:  # class patch: called as a method
            model, args = args[0], args[1:]
        original = getattr(self, _ORIGINAL)
        arguments = self.bind(model, *args, **kwargs).arguments
        if arguments.get("labels") is None or not (model.training or self.in_eval):
            return original(model, *args, **kwargs)
        return _training_forward(model, dict(arguments), self.var_keyword, self.chunk_size)

    def __reduce__(self) -> Any:
        if self.model is None:  # a class's: pickled as that class's attribute
            return getattr, (self.owner, "forward")
        return _bound_forward, (self.model, self.in_eval, self.chunk_size)


def _bound_forward(model: Any, in_eval: bool, chunk_size: int | None) -> _FusedForward:
    """The instance patch of ``model`` (also what unpickling and deepcopy call)."""
    original = _unwrapped(type(model).forward)
    return _FusedForward(original, in_eval, chunk_size, model=model)


def _config_softcap(config) -> float | None:
    """``config.final_logit_softcapping`` as crossent's ``softcap``: transformers applies
    ``c tanh(z / c)``, the same for ``-c`` as for ``c`` (odd in both places), so its
    magnitude; 0 (NaN logits there) is refused, naming the config field."""
    cap = config.final_logit_softcapping
    if cap is None:
        return None
    if not isinstance(cap, (int, float)) or isinstance(cap, bool) or cap == 0 \
            or not math.isfinite(cap):
        raise InputError(f"config.final_logit_softcapping={cap!r}: transformers computes "
                         f"c * tanh(logits / c), which needs a finite nonzero number")
    return abs(float(cap))


def _training_forward(model: Any, arguments: dict[str, Any], var_keyword: str | None,
                      chunk_size: int | None) -> Any:
    """The family's forward (base model, lm_head, softcap, ForCausalLMLoss) with the last
    three replaced by :func:`causal_lm_loss`: the base model gets exactly the arguments the
    original forward gives it."""
    head = _check_model(model)
    arguments.pop("self")
    extra = dict(arguments.pop(var_keyword, {})) if var_keyword else {}
    labels = arguments.pop("labels")
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    # as transformers' can_return_tuple (a keyword in 5.x, a named argument in 4.x)
    return_dict = extra.pop("return_dict", arguments.get("return_dict"))
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    outputs = model.model(**arguments, **extra)
    hidden = outputs.last_hidden_state
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        hidden = _slice_logits_to_keep(hidden, logits_to_keep)
    softcapped = _supported_base(type(model)).__name__ in _SOFTCAPPED
    loss = causal_lm_loss(
        hidden, head.weight, labels, head.bias,
        shift_labels=extra.get("shift_labels"),
        num_items_in_batch=extra.get("num_items_in_batch"),
        ignore_index=extra.get("ignore_index", _IGNORE_INDEX),
        softcap=_config_softcap(model.config) if softcapped else None,
        chunk_size=chunk_size,
    )
    output_class = _hf()["output"]
    fields = set(output_class.__dataclass_fields__)
    rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    if not set(rest) <= fields:
        raise UnsupportedError(
            f"crossent.integrations.transformers: base-model outputs {sorted(set(rest) - fields)} "
            f"have no place in CausalLMOutputWithPast")
    result = output_class(loss=loss, logits=None, **rest)
    # a tuple keeps the logits' place (None): outputs[1] is never silently something else
    return result if return_dict else (loss, None, *result.to_tuple()[1:])


def patch(model: Any, *, in_eval: bool = False, chunk_size: int | None = None) -> Any:
    """Make a causal LM train with :func:`crossent.torch.linear_cross_entropy`.

    Args:
        model: a model instance of one of :data:`SUPPORTED_CLASSES` (or a subclass keeping
            its ``forward``): that instance is patched and returned. Or the class itself:
            every instance, present and future, is patched and the class is returned.
        in_eval: also take the fused path in ``eval()`` mode when labels are given (then the
            output has no logits; the Trainer's evaluation with ``compute_metrics`` needs
            them, hence off by default).
        chunk_size: rows of logits per chunk, passed to ``linear_cross_entropy``
            (``None``: its default, which for small inputs is one unfused matmul).

    Calls without ``labels`` always run the original ``forward``. Patching again replaces
    the options; :func:`unpatch` restores the original.

    Raises:
        crossent.UnsupportedError: the class, its loss or its LM head is not supported.
        crossent.InputError: ``model`` is not a transformers model or model class.

    >>> import transformers
    >>> config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> model = patch(transformers.LlamaForCausalLM(config), chunk_size=2)
    >>> is_patched(model), is_patched(transformers.LlamaForCausalLM)  # this instance only
    (True, False)
    """
    if isinstance(chunk_size, bool) or not (chunk_size is None or (
            isinstance(chunk_size, int) and chunk_size >= 1)):
        raise InputError(f"chunk_size={chunk_size!r} must be an integer >= 1 or None")
    if not isinstance(in_eval, bool):
        raise InputError(f"in_eval={in_eval!r} must be True or False")
    if isinstance(model, type):
        cls: Any = model
        _check_class(cls)
        _hf()  # imported now, not inside a compiled forward
        cls.forward = _FusedForward(_unwrapped(cls.forward), in_eval, chunk_size, owner=cls)
        return cls
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise InputError(f"model: expected a transformers causal-LM model or class, "
                         f"got {type(model).__name__}")
    _check_class(type(model))
    _check_model(model)
    model.forward = _bound_forward(model, in_eval, chunk_size)
    return model


def unpatch(model: Any) -> Any:
    """Undo :func:`patch` on that instance or class (a no-op if it is not patched; an
    instance of a patched class stays patched until the class is unpatched).

    >>> import transformers
    >>> config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> model = patch(transformers.LlamaForCausalLM(config))
    >>> is_patched(unpatch(model)), is_patched(unpatch(model))  # twice: a no-op
    (False, False)
    """
    if isinstance(model, type):
        patched = vars(model).get("forward")
        if hasattr(patched, _ORIGINAL):
            original = getattr(patched, _ORIGINAL)
            delattr(model, "forward")
            # the class defined it itself (what it inherits now is neither the original nor
            # a patched parent's wrapper of it)
            if _unwrapped(getattr(model, "forward", original)) is not original:
                cls: Any = model
                cls.forward = original
        return model
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model: expected a transformers model or model class, "
                         f"got {type(model).__name__}")
    if hasattr(vars(model).get("forward"), _ORIGINAL):
        del vars(model)["forward"]
    return model


def is_patched(model: Any) -> bool:
    """Whether ``model`` (instance or class) trains through crossent's fused loss.

    >>> import transformers
    >>> config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> model = transformers.LlamaForCausalLM(config)
    >>> is_patched(model), is_patched(patch(model))
    (False, True)
    """
    return hasattr(getattr(model, "forward", None), _ORIGINAL)
