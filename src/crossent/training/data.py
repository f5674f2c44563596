"""The data set: scikit-learn's bundled digits, split once and standardised."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import missing_extra


@dataclass(frozen=True)
class Dataset:
    """A fixed train/validation split, features standardised with the training statistics.

    Any arrays of that form train (:func:`crossent.training.train` takes ``data=``):

    >>> x, y = np.array([[-1.0], [1.0]]), np.array([0, 1])
    >>> Dataset(x, y, x, y, num_classes=2).x_val.shape
    (2, 1)
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int


def load_digits_split(*, val_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled digits (no download), split stratified 80/20 with a fixed seed
    (1437 training and 360 validation images), pixels standardised per feature using the
    training set's mean and standard deviation (constant pixels are only centred).

    >>> data = load_digits_split()
    >>> data.x_train.shape, data.x_val.shape, data.num_classes
    ((1437, 64), (360, 64), 10)
    >>> bool(abs(data.x_train.mean(axis=0)).max() < 1e-12)  # centred on the training set
    True

    Without scikit-learn: a ``ModuleNotFoundError`` (``name='sklearn'``, which the
    ``crossent`` command maps to its extra) naming the package and the extra to install.
    """
    try:  # imported here: the rest of crossent.training needs only NumPy
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError as err:
        # the pip name: `pip install sklearn` is a package that deliberately fails
        missing_extra(err, "sklearn", "the digits data set needs scikit-learn: pip install "
                                      "'crossent[demos]' (or scikit-learn)")

    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x.astype(float), y.astype(np.intp), test_size=val_fraction, random_state=split_seed,
        stratify=y,
    )
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return Dataset((x_tr - mean) / std, y_tr, (x_va - mean) / std, y_va, int(y.max()) + 1)
