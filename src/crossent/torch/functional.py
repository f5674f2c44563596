"""Fused cross-entropy for PyTorch: the gradient is computed during the forward pass.

``cross_entropy`` is a drop-in for ``torch.nn.functional.cross_entropy`` (same positional
signature, deprecated ``size_average``/``reduce`` included; class dimension 1) and
``linear_cross_entropy`` for ``torch.nn.functional.linear_cross_entropy`` (same argument
order). Both accept crossent's
``z_loss`` and ``softcap`` too, and ``num_items`` (the summed loss over a caller's count,
for gradient accumulation), ``backend`` and, on the linear head, ``shift`` (the causal-LM
label shift). Device-agnostic (CPU and CUDA): plain tensor operations applied to blocks
of rows (:mod:`crossent.torch._rowblock`), torch's own kernel or a small-batch fused kernel
(:mod:`crossent.torch._small`) for small inputs, the Triton
kernels on GPUs; :func:`crossent.torch._backends.choose_backend` decides which, per call.

This module is the public facade; the code lives in:

* :mod:`crossent.torch._cross_entropy`: :func:`cross_entropy` and its autograd Function;
* :mod:`crossent.torch._linear`: :func:`linear_cross_entropy`, its Function and chunk loop;
* :mod:`crossent.torch._rowblock`: the CPU row-block kernel both run;
* :mod:`crossent.torch._backends`: which kernel serves a call;
* :mod:`crossent.torch._rules`: the rules every backend and the distributed code share
  (dtypes, block and chunk sizing, option checks, denominators, backward).
"""

from __future__ import annotations

from ._cross_entropy import cross_entropy
from ._linear import linear_cross_entropy

__all__ = ["cross_entropy", "linear_cross_entropy"]
