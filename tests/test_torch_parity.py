"""xent_jax reproduces PyTorch's cross-entropy numbers (torch itself is optional).

The expected values below were computed ONCE with torch 2.13.0+cpu in float64
(``torch.set_default_dtype(torch.float64)``) by calling
``torch.nn.functional.cross_entropy(torch.tensor(LOGITS), torch.tensor(LABELS), weight=...,
ignore_index=..., label_smoothing=..., reduction=...)`` and
``torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(PW), reduction=...)(BX, BY)`` on the fixed
inputs defined here, and pasted with ``repr``. CI has no torch, so these constants are the parity
check; ``test_live_torch_agrees`` recomputes fresh cases when torch happens to be installed.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import xent_jax
from tests import reference
from tests.tolerances import assert_close

LOGITS = np.array(
    [
        [1.5, -0.3, 0.2, 0.0],
        [0.1, 2.2, -1.0, 0.4],
        [-0.7, 0.4, 0.9, -1.2],
        [3.0, -2.0, 0.5, 1.0],
        [0.25, 0.25, -0.5, 2.0],
    ]
)
LABELS = np.array([0, 1, 3, 2, 1])
LABELS_NEG100 = np.array([0, -100, 3, -100, 1])
WEIGHT = np.array([0.5, 2.0, 1.0, 1.5])
SOFT_TARGETS = np.array(
    [
        [0.7, 0.1, 0.2, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.25, 0.25, 0.25, 0.25],
        [0.1, 0.0, 0.6, 0.3],
        [0.0, 0.5, 0.0, 0.5],
    ]
)
# PyTorch layout [N, C, d]: the class axis is 1.
LOGITS_NCD = np.array(
    [
        [[0.3, -1.1, 2.0], [1.2, 0.0, -0.4], [-0.5, 0.8, 0.1], [0.9, 0.2, -2.0]],
        [[-0.2, 1.7, 0.6], [0.4, -0.9, 1.1], [2.1, 0.3, -0.6], [0.0, 0.5, 0.7]],
    ]
)
LABELS_ND = np.array([[1, 3, 0], [2, 0, 3]])
BX = np.array([[0.5, -1.5, 2.0, 0.0], [-3.0, 0.7, 1.2, -0.2], [4.0, -0.1, -2.5, 0.9]])
BY = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.3, 1.0], [1.0, 0.0, 0.0, 0.8]])
PW = np.array([2.0, 0.5, 1.0, 3.0])

# (torch kwargs in xent_jax spelling, {reduction: torch result}) for integer labels.
INTEGER_CASES = {
    "plain": (
        {},
        {
            "none": [
                0.5073962550396067,
                0.28406367427750107,
                2.7579777250684456,
                2.7022534476793516,
                2.107417687903482,
            ],
            "sum": 8.359108789968387,
            "mean": 1.6718217579936774,
        },
    ),
    "weight": (
        {"class_weights": WEIGHT},
        {
            "none": [
                0.25369812751980336,
                0.5681273485550021,
                4.136966587602668,
                2.7022534476793516,
                4.214835375806964,
            ],
            "sum": 11.87588088716379,
            "mean": 1.69655441245197,
        },
    ),
    "smoothing": (
        {"label_smoothing": 0.1},
        {
            "none": [
                0.6223962550396067,
                0.4615636742775011,
                2.6529777250684456,
                2.689753447679352,
                2.082417687903482,
            ],
            "sum": 8.509108789968387,
            "mean": 1.7018217579936774,
        },
    ),
    "weight+smoothing": (
        {"class_weights": WEIGHT, "label_smoothing": 0.2},
        {
            "none": [
                0.6873075657757444,
                0.873017797413377,
                3.721567701349246,
                2.9873661200633195,
                3.804972722621442,
            ],
            "sum": 12.07423190722313,
            "mean": 1.7248902724604471,
        },
    ),
    "weight+smoothing+ignore": (
        {"class_weights": WEIGHT, "label_smoothing": 0.15, "ignore_index": 2},
        {
            "none": [
                0.5789052062117591,
                0.7967951851987831,
                3.8254174229126012,
                0.0,
                3.9074383859178226,
            ],
            "sum": 9.108556200240965,
            "mean": 1.5180927000401607,
        },
    ),
    "ignore": (
        {"ignore_index": 1},
        {
            "none": [0.5073962550396067, 0.0, 2.7579777250684456, 2.7022534476793516, 0.0],
            "sum": 5.967627427787404,
            "mean": 1.9892091425958014,
        },
    ),
}

# torch's default ignore_index=-100, with weight=WEIGHT and label_smoothing=0.1.
NEG100_EXPECTED = {
    "none": [0.47050284664777386, 0.0, 3.9292671444759573, 0.0, 4.009904049214203],
    "sum": 8.409674040337933,
    "mean": 2.102418510084483,
}
# LOGITS_NCD / LABELS_ND with weight=WEIGHT, label_smoothing=0.1, ignore_index=0.
NCD_EXPECTED = {
    "none": [
        [1.6933554071505617, 2.0237426473003124, 0.0],
        [0.541329130677791, 0.0, 1.9312086919441442],
    ],
    "sum": 6.189635877072809,
    "mean": 1.0316059795121348,
}
# Probability targets SOFT_TARGETS with weight=WEIGHT, label_smoothing=0.1.
SOFT_EXPECTED = {
    "none": [
        1.1426670040316858,
        0.7205725729841896,
        2.059972156335557,
        2.773012594162477,
        2.3544850694359196,
    ],
    "sum": 9.050709396949827,
    "mean": 1.8101418793899655,
}
SOFT_PLAIN_EXPECTED = {
    "none": [
        0.9473962550396069,
        0.28406367427750107,
        1.7079777250684456,
        2.3022534476793517,
        1.232417687903482,
    ],
    "mean": 1.2948217579936774,
}
# BCEWithLogitsLoss(pos_weight=PW) and BCEWithLogitsLoss() on BX, BY.
BCE_PW_EXPECTED = {
    "none": [
        [0.9481539683602134, 0.20141327798275244, 0.1269280110429725, 0.6931471805599453],
        [0.048587351573742055, 0.20159302444272895, 1.1032824673380313, 2.3944166081447755],
        [0.036299855835619475, 0.6443966600735709, 0.07888973429254964, 1.0670000743034282],
    ],
    "sum": 7.54410821395033,
    "mean": 0.6286756844958609,
}
BCE_EXPECTED = {
    "none": [
        [0.4740769841801067, 0.20141327798275244, 0.1269280110429725, 0.6931471805599453],
        [0.048587351573742055, 0.4031860488854579, 1.1032824673380313, 0.7981388693815918],
        [0.018149927917809738, 0.6443966600735709, 0.07888973429254964, 0.5211538747320877],
    ],
    "mean": 0.4259458656633848,
}

DTYPES = [np.float32, np.float64]
REDUCTIONS = ["none", "sum", "mean"]
IMPLEMENTATIONS = {"xent_jax": xent_jax, "reference": reference}
LOSS_NAMES = {
    "int": "softmax_cross_entropy_with_integer_labels",
    "dense": "softmax_cross_entropy",
    "bce": "sigmoid_binary_cross_entropy",
}


def _run(impl, kind, dtype, logits, labels, **kwargs):
    """Evaluates ``impl``'s ``kind`` loss with float inputs cast to ``dtype``; returns float64."""
    fn = getattr(IMPLEMENTATIONS[impl], LOSS_NAMES[kind])
    logits = np.asarray(logits, dtype)
    if kind != "int":
        labels = np.asarray(labels, dtype)
    kwargs = {
        k: np.asarray(v, dtype) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()
    }
    with jax.enable_x64(dtype == np.float64):
        out = fn(logits, labels, **kwargs)
        if impl == "xent_jax":
            assert out.dtype == dtype
        return np.asarray(out, np.float64)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(INTEGER_CASES))
def test_integer_labels_match_torch(case, reduction, dtype, impl):
    kwargs, expected = INTEGER_CASES[case]
    out = _run(impl, "int", dtype, LOGITS, LABELS, reduction=reduction, **kwargs)
    assert_close(out, expected[reduction], dtype)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_default_ignore_index(reduction, dtype, impl):
    out = _run(
        impl,
        "int",
        dtype,
        LOGITS,
        LABELS_NEG100,
        class_weights=WEIGHT,
        label_smoothing=0.1,
        ignore_index=-100,
        reduction=reduction,
    )
    assert_close(out, NEG100_EXPECTED[reduction], dtype)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_class_axis_one_matches_torch_layout(reduction, dtype, impl):
    out = _run(
        impl,
        "int",
        dtype,
        LOGITS_NCD,
        LABELS_ND,
        axis=1,
        class_weights=WEIGHT,
        label_smoothing=0.1,
        ignore_index=0,
        reduction=reduction,
    )
    assert_close(out, NCD_EXPECTED[reduction], dtype)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"class_weights": WEIGHT, "label_smoothing": 0.1}, SOFT_EXPECTED),
        ({}, SOFT_PLAIN_EXPECTED),
    ],
    ids=["weight+smoothing", "plain"],
)
def test_probability_targets_match_torch(kwargs, expected, dtype, impl):
    for reduction, value in expected.items():
        out = _run(impl, "dense", dtype, LOGITS, SOFT_TARGETS, reduction=reduction, **kwargs)
        assert_close(out, value, dtype, err_msg=reduction)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("pos_weight", "expected"),
    [(PW, BCE_PW_EXPECTED), (None, BCE_EXPECTED)],
    ids=["pos_weight", "plain"],
)
def test_bce_with_logits_matches_torch(pos_weight, expected, dtype, impl):
    for reduction, value in expected.items():
        out = _run(impl, "bce", dtype, BX, BY, pos_weight=pos_weight, reduction=reduction)
        assert_close(out, value, dtype, err_msg=reduction)


def test_mean_over_all_ignored_is_zero_not_nan():
    # torch 2.13.0 returns nan for F.cross_entropy(LOGITS, full(5, 2), ignore_index=2); the
    # contract deliberately returns 0.0 instead.
    labels = np.full(LABELS.shape, 2)
    for kwargs in ({}, {"class_weights": WEIGHT, "label_smoothing": 0.1}):
        out = xent_jax.softmax_cross_entropy_with_integer_labels(
            np.float32(LOGITS), labels, ignore_index=2, reduction="mean", **kwargs
        )
        assert float(out) == 0.0


def test_live_torch_agrees():
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    rng = np.random.default_rng(20240613)
    logits = rng.normal(size=(6, 5, 3)) * 2.0
    labels = rng.integers(0, 5, size=(6, 3))
    targets = np.moveaxis(rng.dirichlet(np.ones(5), size=(6, 3)), -1, 1)
    weight = rng.uniform(0.2, 2.0, size=5)
    bx, by = rng.normal(size=(4, 5)) * 3.0, rng.uniform(size=(4, 5))
    pos_weight = rng.uniform(0.1, 3.0, size=5)
    with jax.enable_x64(True):
        for reduction in REDUCTIONS:
            for eps in (0.0, 0.25):
                expected = functional.cross_entropy(
                    torch.tensor(logits),
                    torch.tensor(labels),
                    weight=torch.tensor(weight),
                    ignore_index=2,
                    label_smoothing=eps,
                    reduction=reduction,
                ).numpy()
                out = xent_jax.softmax_cross_entropy_with_integer_labels(
                    logits,
                    labels,
                    axis=1,
                    class_weights=weight,
                    ignore_index=2,
                    label_smoothing=eps,
                    reduction=reduction,
                )
                assert_close(out, expected, np.float64)
                expected = functional.cross_entropy(
                    torch.tensor(logits),
                    torch.tensor(targets),
                    weight=torch.tensor(weight),
                    label_smoothing=eps,
                    reduction=reduction,
                ).numpy()
                out = xent_jax.softmax_cross_entropy(
                    logits,
                    targets,
                    axis=1,
                    class_weights=weight,
                    label_smoothing=eps,
                    reduction=reduction,
                )
                assert_close(out, expected, np.float64)
            expected = torch.nn.BCEWithLogitsLoss(
                pos_weight=torch.tensor(pos_weight), reduction=reduction
            )(torch.tensor(bx), torch.tensor(by)).numpy()
            out = xent_jax.sigmoid_binary_cross_entropy(
                bx, by, pos_weight=pos_weight, reduction=reduction
            )
            assert_close(out, expected, np.float64)
