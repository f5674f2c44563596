"""crossent: cross-entropy from the first idea to the loss you train with.

Surprise -> entropy -> cross-entropy -> the loss, written once against the Python array
API standard, so every function takes and returns NumPy, PyTorch, JAX or
array-api-strict arrays (Python numbers and lists are taken as NumPy).

>>> import crossent as xe
>>> round(float(xe.entropy([0.2, 0.3, 0.5], base=2)), 4)
1.4855
"""

from .activations import log_sigmoid, log_softmax, logsumexp, sigmoid, softmax
from .errors import InputError, UnsupportedError
from .grad import (
    multilabel_cross_entropy_grad,
    sigmoid_binary_cross_entropy_grad,
    softmax_cross_entropy_grad,
)
from .losses import (
    binary_cross_entropy,
    multilabel_cross_entropy,
    sigmoid_binary_cross_entropy,
    sigmoid_focal_loss,
    softmax_cross_entropy,
)
from .measures import binary_entropy, cross_entropy, entropy, kl_divergence, surprisal
from .targets import mixup, mixup_params, one_hot, smooth_labels

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "UnsupportedError",
    "binary_cross_entropy",
    "binary_entropy",
    "cross_entropy",
    "entropy",
    "kl_divergence",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "mixup",
    "mixup_params",
    "multilabel_cross_entropy",
    "multilabel_cross_entropy_grad",
    "one_hot",
    "sigmoid",
    "sigmoid_binary_cross_entropy",
    "sigmoid_binary_cross_entropy_grad",
    "sigmoid_focal_loss",
    "smooth_labels",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_grad",
    "surprisal",
]
