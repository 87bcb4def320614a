"""The README's code runs as printed, and the results its comments state are the library's.

Each ```python block of README.md is executed as a new user would paste it. A statement whose
trailing comment starts with a number (``# 0.811 bits``) must evaluate to that number to the
digits shown; the other claims of the blocks are checked one by one below.
"""

import ast
import io
import re
import tokenize
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xent_jax
from tests.tolerances import tolerance

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
# Any fence that opens Python code, however it is tagged (```py, ```python3, ...).
_ANY_PYTHON_FENCE = re.compile(r"^ *```\s*py", re.MULTILINE)
_STATED_NUMBER = re.compile(r"#\s*(-?\d+\.\d+)\b")
# torch.nn.functional.cross_entropy on the Quickstart's logits and labels with its options
# (label_smoothing=0.1, weight=[1, 2, 0.5], ignore_index=-100, reduction="mean"), computed once
# in float64 with torch 2.13.0+cpu (torch is not a dependency).
_TORCH_QUICKSTART_LOSS = 0.3359069563261323


def _blocks() -> list[str]:
    text = README.read_text()
    found = _BLOCK.findall(text)
    assert len(found) == len(_ANY_PYTHON_FENCE.findall(text)), "tag README code as ```python"
    blocks = []
    for indent, body in found:
        # A block indented inside a list item is dedented by its fence's indentation.
        assert all(line.startswith(indent) or not line.strip() for line in body.splitlines())
        blocks.append("\n".join(line[len(indent) :] for line in body.splitlines()))
    return blocks


def _comments_by_line(block: str) -> dict[int, str]:
    """The comment on each line of ``block`` (a ``#`` inside a string is not one)."""
    tokens = tokenize.generate_tokens(io.StringIO(block).readline)
    return {t.start[0]: t.string for t in tokens if t.type == tokenize.COMMENT}


def _block_with(marker: str) -> str:
    matches = [block for block in _blocks() if marker in block]
    assert len(matches) == 1, f"expected one README python block with {marker!r}"
    return matches[0]


def _run(block: str, namespace: dict | None = None) -> tuple[dict, list]:
    """Executes ``block`` statement by statement (in ``namespace``, a fresh one by default);
    returns the namespace and, for every top-level expression statement, ``(value, the comment
    on its last line or "")``."""
    comments = _comments_by_line(block)
    namespace = {} if namespace is None else namespace
    expressions = []
    for statement in ast.parse(block).body:
        module = ast.Module(body=[statement], type_ignores=[])
        if isinstance(statement, ast.Expr):
            value = eval(compile(ast.Expression(statement.value), "README.md", "eval"), namespace)
            expressions.append((value, comments.get(statement.end_lineno, "")))
        else:
            exec(compile(module, "README.md", "exec"), namespace)
    return namespace, expressions


def _after_quickstart(marker: str) -> tuple[dict, list]:
    """Runs the block with ``marker`` where a reader runs it: after the Quickstart's imports."""
    namespace, _ = _run(_block_with("import xent_jax"))
    return _run(_block_with(marker), namespace)


def test_every_python_block_of_the_readme_is_checked_here():
    markers = ("import xent_jax", "@xent_jax.checked", "value_and_grad", "shift=True")
    assert len(_blocks()) == len(markers)
    for marker in markers:
        _block_with(marker)


def test_quickstart_runs_and_its_stated_values_hold():
    _, expressions = _run(_block_with("import xent_jax"))
    stated = [(value, _STATED_NUMBER.match(comment)) for value, comment in expressions]
    stated = [(value, float(match.group(1)), match.group(1)) for value, match in stated if match]
    assert len(stated) == 1  # the entropy example, in bits
    for value, number, text in stated:
        decimals = len(text.split(".")[1])
        assert abs(float(value) - number) <= 0.5 * 10.0**-decimals, (text, float(value))

    values = [value for value, _ in expressions]
    per_example, with_options, autodiff, closed_form = values[:4]
    assert per_example.shape == (2,)
    # "torch's numbers": PyTorch's loss for the same call.
    np.testing.assert_allclose(with_options, _TORCH_QUICKSTART_LOSS, **tolerance(jnp.float32))
    f32 = tolerance(jnp.float32)
    np.testing.assert_allclose(autodiff, closed_form, **f32)
    # "softmax - one-hot", averaged over the two examples.
    logits = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.0]])
    expected = (jax.nn.softmax(logits) - jax.nn.one_hot(jnp.array([0, 1]), 3)) / 2
    np.testing.assert_allclose(autodiff, expected, **f32)


def test_the_hard_error_example_raises_the_error_it_prints():
    block = _block_with("@xent_jax.checked")
    namespace, _ = _after_quickstart("@xent_jax.checked")
    printed = re.search(r"# (ValueError: .*)", block).group(1)
    logits = jnp.zeros((2, 4))
    with pytest.raises(ValueError) as error:
        namespace["loss"](logits, jnp.array([0, 7]))
    assert f"ValueError: {error.value}" == printed
    np.testing.assert_allclose(namespace["loss"](logits, jnp.array([0, 3])), np.log(4), rtol=1e-6)


@pytest.mark.slow
def test_large_vocabulary_example_gives_the_materialised_loss():
    namespace, _ = _after_quickstart("value_and_grad")
    x, w, labels = namespace["x"], namespace["w"], namespace["labels"]
    dx, dw = namespace["grads"]
    assert dx.shape == x.shape and dw.shape == w.shape
    assert np.isfinite(np.asarray(dx)).all() and np.isfinite(np.asarray(dw)).all()
    materialised = xent_jax.softmax_cross_entropy_with_integer_labels(
        x @ w, labels, reduction="mean"
    )
    np.testing.assert_allclose(namespace["loss"], materialised, **tolerance(jnp.float32))


def test_the_porting_section_states_what_the_library_does():
    section = README.read_text().split("## Porting from", 1)[1].split("\n## ", 1)[0]
    assert "one-line change" not in README.read_text().replace("Not a one-line change", "")
    logits = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.0]])
    padded = jnp.array([0, -100])
    # "an unported call on -100-padded labels gives NaN, so pass ignore_index=-100"
    assert "-100-padded labels gives NaN" in section
    assert np.isnan(xent_jax.softmax_cross_entropy_with_integer_labels(logits, padded)[1])
    fixed = xent_jax.softmax_cross_entropy_with_integer_labels(logits, padded, ignore_index=-100)
    assert np.isfinite(fixed).all() and fixed[1] == 0
    # "scipy.stats.entropy([3, 1], base=2) is 0.811 there and -4.75 here"
    assert "is 0.811 there and -4.75 here" in section
    counts = jnp.array([3.0, 1.0])
    assert round(float(xent_jax.entropy(counts, base=2)), 2) == -4.75
    assert round(float(xent_jax.entropy(counts / counts.sum(), base=2)), 3) == 0.811
    # "sigmoid BCE labels must be floating (optax accepts integer 0/1 labels: cast them)"
    assert "sigmoid BCE labels must be floating" in section
    with pytest.raises(TypeError, match="floating"):
        xent_jax.sigmoid_binary_cross_entropy(jnp.array([0.5, -1.0]), jnp.array([1, 0]))
    # "The probability losses clip to [1e-7, 1 − 1e-7] silently"
    assert "clip to [1e-7, 1 − 1e-7]" in section
    wrong = jnp.array([0.0, 1.0])
    clipped = xent_jax.binary_cross_entropy(jnp.array([1.5, -0.5]), wrong)
    at_bounds = xent_jax.binary_cross_entropy(jnp.array([1 - 1e-7, 1e-7]), wrong)
    np.testing.assert_array_equal(clipped, at_bounds)
    assert np.isfinite(clipped).all()
    # "options after the first two arguments are keyword-only"
    with pytest.raises(TypeError):
        xent_jax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1]), -1)


def test_language_model_example_states_what_it_computes():
    namespace, expressions = _after_quickstart("shift=True")
    (weight_sum, weight_comment), (entropy_shape, _) = expressions
    assert float(weight_sum) == 25.0 and weight_comment.startswith("# 25 target tokens")
    assert entropy_shape == (2, 16)
    hidden, tokens, w_out = namespace["hidden"], namespace["tokens"], namespace["w_out"]
    padding = namespace["padding"]
    # Position t scored on token t + 1, where token t + 1 is real: the materialised loss.
    materialised = xent_jax.softmax_cross_entropy_with_integer_labels(
        hidden[:, :-1] @ w_out,
        tokens[:, 1:],
        where=padding[:, 1:],
        z_loss=1e-4,
        reduction="mean",
    )
    np.testing.assert_allclose(namespace["loss"], materialised, **tolerance(jnp.float32))
