"""Sphinx configuration of the xent_jax documentation (``make docs``).

The build is offline and deterministic: MathJax comes from a PyPI package, no inventory is
fetched, and every page with code cells is executed afresh by myst-nb, so an example that stops
running, or whose printed output changes, is seen at build time.
"""

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The notebook kernels are separate processes: they import xent_jax and research/ (the tutorial
# draws the research scripts' figures) from this checkout, whatever is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)
# One CPU device and no GPU probing in the kernels, as in the test suite.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import xent_jax  # noqa: E402

project = "xent_jax"
author = "the xent_jax developers"
copyright = "the xent_jax developers"
version = release = xent_jax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
    # Ships MathJax 3 and points mathjax_path at the copy in _static: math renders offline.
    "sphinx-mathjax-offline",
]

exclude_patterns = ["_build", "jupyter_execute", ".gitignore"]
nitpicky = True
# Types of other libraries cannot be resolved without their inventories (fetching them would
# need the network); every reference to an xent_jax name must still resolve.
nitpick_ignore_regex = [
    (r"py:(class|obj|data|func)", r"(jax|jaxlib|numpy|np|optax|typing|collections)\..*"),
    # Sphinx >= 8.2 renders an autodoc_type_aliases name as a reference to this helper class.
    (r"py:class", r"TypeAliasForwardRef"),
]

# Google-style docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "signature"
autodoc_type_aliases = {
    "ArrayLike": "jax.typing.ArrayLike",
    "Reduction": "xent_jax.Reduction",
    "v.Reduction": "xent_jax.Reduction",
}
autodoc_member_order = "bysource"
python_use_unqualified_type_names = True
add_module_names = False

# MyST: $...$ math in the pages, ::: fences, and heading anchors for cross-page links.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Every page with code cells runs at build time; an exception fails the build.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 600
# Tables in the Markdown that cells display (the tutorial's table of every route).
nb_render_markdown_format = "myst"

html_theme = "sphinx_book_theme"
html_title = f"xent_jax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_last_updated_fmt = None  # deterministic output
html_static_path = []


def _share_compilations(app):
    """Points the kernels at one JAX compilation cache for this build (in its doctree folder).

    Every page runs in a kernel of its own, and most pages compile the same small programs;
    sharing the compiled programs, not their results, keeps the build fast.
    """
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(Path(app.doctreedir) / "jax-cache")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


def _unwrap_type_aliases(app, what, name, obj, options, signature, return_annotation):
    """Shows ``X | None`` for an alias ``X`` as such: Sphinx 9 prints the wrapper's repr."""
    unwrap = lambda text: text and re.sub(r"TypeAliasForwardRef\('([^']*)'\)", r"\1", text)
    return unwrap(signature), unwrap(return_annotation)


def setup(app):
    app.connect("builder-inited", _share_compilations)
    app.connect("autodoc-process-signature", _unwrap_type_aliases)
