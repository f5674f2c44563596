"""crossent: cross-entropy from the first idea to the loss you train with.

Surprise -> entropy -> cross-entropy -> the loss, written once against the Python array
API standard, so every function takes and returns NumPy, PyTorch, JAX or
array-api-strict arrays (Python numbers and lists are taken as NumPy).

>>> import crossent as xe
>>> round(float(xe.entropy([0.2, 0.3, 0.5], base=2)), 4)
1.4855
"""

from .activations import log_sigmoid, log_softmax, logit, logsumexp, sigmoid, softmax
from .errors import InputError, UnsupportedError
from .grad import (
    multilabel_cross_entropy_grad,
    sigmoid_binary_cross_entropy_grad,
    softmax_cross_entropy_grad,
)
from .losses import (
    binary_cross_entropy,
    categorical_focal_loss,
    multilabel_cross_entropy,
    nll_loss,
    poly1_cross_entropy,
    sigmoid_binary_cross_entropy,
    sigmoid_focal_loss,
    softmax_cross_entropy,
    softmax_focal_loss,
)
from .measures import (
    binary_entropy,
    cross_entropy,
    entropy,
    generalized_kl_divergence,
    kl_divergence,
    kl_divergence_terms,
    surprisal,
)
from .targets import mixup, mixup_params, one_hot, smooth_labels

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "UnsupportedError",
    "binary_cross_entropy",
    "binary_entropy",
    "categorical_focal_loss",
    "cross_entropy",
    "entropy",
    "generalized_kl_divergence",
    "kl_divergence",
    "kl_divergence_terms",
    "log_sigmoid",
    "log_softmax",
    "logit",
    "logsumexp",
    "mixup",
    "mixup_params",
    "multilabel_cross_entropy",
    "multilabel_cross_entropy_grad",
    "nll_loss",
    "one_hot",
    "poly1_cross_entropy",
    "sigmoid",
    "sigmoid_binary_cross_entropy",
    "sigmoid_binary_cross_entropy_grad",
    "sigmoid_focal_loss",
    "smooth_labels",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_grad",
    "softmax_focal_loss",
    "surprisal",
]
