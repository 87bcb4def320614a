"""The package builds, and the built wheel works with only the core dependencies.

``python -m build`` makes the sdist and, from it, the wheel, as a user or a release would (in an
isolated build environment); the wheel is then installed into a fresh virtual environment that
sees none of the test or research extras, where ``import xent_jax`` and a docstring example run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import xent_jax

ROOT = Path(__file__).resolve().parents[1]
# What the build reads: the metadata, the README it embeds, and the package.
_SOURCES = ("pyproject.toml", "README.md", "xent_jax")

# Run inside the fresh environment: the public API imports, and docstring examples hold.
# pytest is not there, so its NUMBER option (the docstrings print floats to the digits that
# matter) is redone with the standard library: a float matches to the precision written.
_CHECK = r"""
import doctest, importlib.metadata, importlib.util, re
import xent_jax

assert importlib.metadata.version("xent_jax") == xent_jax.__version__, xent_jax.__version__
for extra in ("pytest", "matplotlib", "sklearn", "ml_collections", "sphinx"):
    assert importlib.util.find_spec(extra) is None, f"{extra} is not a core dependency"
missing = [name for name in xent_jax.__all__ if not hasattr(xent_jax, name)]
assert not missing, missing

FLOAT = re.compile(r"(-?\d+)\.(\d*)(?:[eE]([-+]?\d+))?")


class NumberChecker(doctest.OutputChecker):
    def check_output(self, want, got, optionflags):
        if super().check_output(want, got, optionflags):
            return True
        wants, gots = list(FLOAT.finditer(want)), list(FLOAT.finditer(got))
        if len(wants) != len(gots):
            return False
        for w, g in zip(wants, gots):
            tolerance = 10.0 ** (int(w.group(3) or 0) - len(w.group(2)))
            if abs(float(w.group(0)) - float(g.group(0))) > tolerance:
                return False
        return super().check_output(FLOAT.sub("0.0", want), FLOAT.sub("0.0", got), optionflags)


flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
runner = doctest.DocTestRunner(checker=NumberChecker(), optionflags=flags)
for fn in (xent_jax.entropy, xent_jax.softmax_cross_entropy_with_integer_labels):
    for test in doctest.DocTestFinder().find(fn, fn.__name__, globs={}):
        runner.run(test)
result = runner.summarize(verbose=False)
assert result.attempted >= 2 and result.failed == 0, result
print("ok", xent_jax.__file__)
"""


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """Builds sdist + wheel from a copy of the sources (the build writes egg-info beside them)."""
    src = tmp_path_factory.mktemp("src")
    for name in _SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(src)])
    return out


@pytest.mark.slow
def test_sdist_and_wheel_are_built_with_the_package_and_its_type_marker(dist):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version == xent_jax.__version__
    (wheel,) = dist.glob(f"xent_jax-{version}-py3-none-any.whl")
    (sdist,) = dist.glob(f"xent_jax-{version}.tar.gz")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert "xent_jax/py.typed" in names
    assert {"xent_jax/__init__.py", "xent_jax/analytic.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "research/", "configs/"))]
    with tarfile.open(sdist) as tf:
        members = {m.split("/", 1)[1] for m in tf.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md", "xent_jax/py.typed", "xent_jax/__init__.py"} <= members


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_with_only_the_core_dependencies(dist, tmp_path):
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    # sys.executable is the project's venv: `-m venv` bases the new one on its interpreter,
    # without the project's site-packages. This pip installs into it (--python), which spares
    # bootstrapping a pip of its own.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    _run([*pip, "install", "--quiet", "--no-compile", str(wheel)])
    # From another folder, so that the checkout's xent_jax/ cannot be the one imported.
    done = _run([str(python), "-c", _CHECK], cwd=tmp_path)
    assert done.stdout.startswith("ok ") and str(venv) in done.stdout
