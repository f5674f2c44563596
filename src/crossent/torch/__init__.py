"""Fused PyTorch cross-entropy: the gradient computed in the forward pass, row block by row
block, and a chunked linear + cross-entropy head that never holds all the logits.

``import crossent.torch as xt``; ``xt.cross_entropy`` / ``xt.CrossEntropyLoss`` replace
``torch.nn.functional.cross_entropy`` / ``torch.nn.CrossEntropyLoss`` and
``xt.linear_cross_entropy`` / ``xt.LinearCrossEntropyLoss`` torch's linear versions.
``python -m crossent.torch.bench`` measures them against torch. On CPU the gradient
buffers are reused from step to step (:func:`empty_cache`, :func:`set_buffer_reuse`),
never while anything (a tensor, a view, another process through shared memory) can
still see them, and the row blocks run on worker threads with one OpenMP thread each
(:func:`set_block_workers`), so that a busy machine does not stall them at barriers.
:func:`set_compiled_kernel` opts bfloat16, float16 and float32 CPU logits into a compiled
(inductor) kernel: faster per step, 5-25 s to compile on first use.

The contract: torch's numbers or an error naming what is unsupported. Double backward,
``torch.func`` transforms, forward-mode AD and ``jit.trace`` work (through a composable
path in plain torch ops, :mod:`crossent.torch._composite`); bad input raises
:class:`crossent.InputError`; see docs/guarantees.md.
"""

from ._blockpool import set_block_workers
from ._buffers import empty_cache, set_buffer_reuse
from ._inductor import set_compiled_kernel
from ._statistics import TokenStatistics
from .functional import cross_entropy, linear_cross_entropy
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = [
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "TokenStatistics",
    "cross_entropy",
    "empty_cache",
    "linear_cross_entropy",
    "set_block_workers",
    "set_buffer_reuse",
    "set_compiled_kernel",
]
