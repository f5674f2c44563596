"""Vocab-parallel (tensor-parallel) cross-entropy on ``torch.distributed``.

When the output layer's classes are split across the ranks of a tensor-parallel group,
no rank holds a whole row of logits. :func:`vocab_parallel_cross_entropy` (logits given)
and :func:`vocab_parallel_linear_cross_entropy` (hidden states and the local slice of the
output weight given, chunked so no full logits exist) compute the exact single-process
loss and gradients while communicating a few numbers per row, never anything of size
``V``. :func:`global_num_items` counts the targets of a whole data-parallel step for
``reduction="sum", num_items=...`` (PITFALLS 11).

Runs on any initialized process group (gloo on CPU, NCCL on CUDA); crossent has no
launcher of its own (use ``torchrun``). Without ``torch.distributed`` initialized the
functions run single-process. See ``docs/scaling.md`` for the cost model.

Each rank's local work (per-row partials over its class slice, its logit gradient) uses
crossent's kernels (``backend=``, the same on every rank): on CUDA/ROCm the Triton kernels
of :mod:`crossent.torch._triton.vocab_parallel` (one launch each, no host synchronisation),
on CPU torch operations on row blocks shared out to crossent's worker threads
(:mod:`crossent.torch._blockpool`); :mod:`._local` chooses. The collectives run in the
calling thread and are the same for every backend.
"""

from .accumulate import global_num_items
from .cross_entropy import vocab_parallel_cross_entropy
from .linear import vocab_parallel_linear_cross_entropy

__all__ = [
    "global_num_items",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]
