"""Train a classifier with each loss and compare them: the article's "why cross-entropy" on data.

The experiment behind ``crossent train``: softmax regression or a one-hidden-layer MLP on
scikit-learn's bundled ``load_digits`` (1797 8x8 images, 10 classes, no download), trained in
plain NumPy with crossent's own analytic gradients (no autograd) and mini-batch SGD or Adam.
The losses compared, all functions of the logits ``z`` of one row with true class ``y`` and
``p = softmax(z)``, averaged over the rows of a batch:

* ``ce``: ``-log p_y``; gradient ``p - e_y`` (the article's ``softmax(a) - b``).
* ``smoothed-ce``: ``-sum_c t_c log p_c`` with ``t = (1 - eps) e_y + eps / C`` (label
  smoothing, eps = 0.1); gradient ``p - t``.
* ``mse``: ``sum_c (p_c - e_yc)^2`` (squared error on the softmax output, the Brier score);
  gradient ``p * (g - <p, g>)`` with ``g = 2 (p - e_y)``.
* ``abs``: ``1 - p_y`` (the article's too-narrow plain error); gradient ``p_y (p - e_y)``.
* ``focal``: ``-(1 - p_y)^gamma log p_y`` (Lin et al. 2017, gamma = 2); gradient
  ``-[gamma (1 - p_y)^(gamma - 1) p_y log p_y - (1 - p_y)^gamma] (p - e_y)``.

Every gradient through the softmax has the form ``J^T g`` with the softmax Jacobian
``J = diag(p) - p p^T``, i.e. ``p * (g - <p, g>)`` where ``g = dl/dp``. For cross-entropy the
``1/p_y`` in ``g`` cancels the ``p_y`` of the Jacobian, which leaves the *linear*
``p - e_y``; for mse and abs it does not, so their gradients vanish where the model is
confidently wrong (``p_y -> 0``, a wrong class's probability -> 1; for abs exactly by the
factor ``p_y``), and learning from such mistakes is slow.

Each epoch reports the training loss (of the loss being trained), the validation accuracy,
the validation cross-entropy (nats) and the expected calibration error (15 bins, Guo et al.
2017). Everything is reproducible from ``seed``: the same seed gives identical numbers.

The modules, one concern each (every public name is re-exported here):

* :mod:`~crossent.training.losses`: the losses above and their logit gradients.
* :mod:`~crossent.training.metrics`: reliability diagram and expected calibration error.
* :mod:`~crossent.training.data`: the digits split.
* :mod:`~crossent.training.model`: softmax regression and the MLP, forward and backward.
* :mod:`~crossent.training.optim`: SGD and Adam.
* :mod:`~crossent.training.experiment`: the run settings, training loop, comparison, JSON.

>>> import numpy as np
>>> z, y = np.array([[2.0, 1.0, 0.1]]), np.array([0])
>>> bool(np.allclose(softmax_mse_grad(z, y), finite_difference_loss_grad(softmax_mse_loss, z, y)))
True
"""

from .data import Dataset, load_digits_split
from .experiment import (
    TARGET_ACCURACY,
    TOUR_CONFIG,
    EpochCallback,
    EpochMetrics,
    RunResult,
    TrainConfig,
    check_losses,
    compare,
    evaluate,
    metrics_json,
    train,
)

# Private, re-exported because tests/test_training.py checks it as ``crossent.training._finite``.
from .experiment import _finite as _finite
from .losses import (
    LOSS_TITLES,
    LOSSES,
    Loss,
    finite_difference_loss_grad,
    make_loss,
    softmax_abs_grad,
    softmax_abs_loss,
    softmax_focal_grad,
    softmax_focal_loss,
    softmax_mse_grad,
    softmax_mse_loss,
)
from .metrics import N_BINS, Reliability, expected_calibration_error, reliability
from .model import MODELS, Params, backward, forward, init_params
from .optim import OPTIMIZERS, SGD, Adam

__all__ = [
    "LOSSES",
    "LOSS_TITLES",
    "MODELS",
    "N_BINS",
    "OPTIMIZERS",
    "SGD",
    "TARGET_ACCURACY",
    "TOUR_CONFIG",
    "Adam",
    "Dataset",
    "EpochCallback",
    "EpochMetrics",
    "Loss",
    "Params",
    "Reliability",
    "RunResult",
    "TrainConfig",
    "backward",
    "check_losses",
    "compare",
    "evaluate",
    "expected_calibration_error",
    "finite_difference_loss_grad",
    "forward",
    "init_params",
    "load_digits_split",
    "make_loss",
    "metrics_json",
    "reliability",
    "softmax_abs_grad",
    "softmax_abs_loss",
    "softmax_focal_grad",
    "softmax_focal_loss",
    "softmax_mse_grad",
    "softmax_mse_loss",
    "train",
]
