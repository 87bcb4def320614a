"""scikit-learn's bundled data sets (no network), split and standardised reproducibly."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sklearn import datasets
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

LOADERS = {
    "breast_cancer": datasets.load_breast_cancer,
    "iris": datasets.load_iris,
    "digits": datasets.load_digits,
}


class Split(NamedTuple):
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


def load_split(name: str, *, test_size: float, seed: int, standardize: bool = True) -> Split:
    """Stratified train/test split of a bundled data set; features standardised with the
    training statistics (float64), labels int32."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(LOADERS)}")
    x, y = LOADERS[name](return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float64),
        y.astype(np.int32),
        test_size=test_size,
        random_state=seed,
        stratify=y,
    )
    if standardize:
        scaler = StandardScaler().fit(x_train)
        x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    return Split(x_train, x_test, y_train, y_test)
