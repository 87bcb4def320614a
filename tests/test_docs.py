"""The documentation site builds as ``make docs`` builds it, and documents the whole public API.

One Sphinx build, with warnings as errors and nitpicky cross-references (a broken reference, a
docstring Sphinx cannot parse, or a page left out of the table of contents fails it); myst-nb
executes every page's examples, so an example that raises fails it too. The checks below then
read the built HTML.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import xent_jax
import xent_jax.analytic

ROOT = Path(__file__).resolve().parents[1]
# The command of `make docs`, into a temporary folder.
_SPHINX = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-b", "html"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    html = out / "html"
    args = [*_SPHINX, "-d", str(out / "doctrees"), str(ROOT / "docs"), str(html)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT)
    log = done.stdout + done.stderr
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    # The kernels' own notice about their local TCP sockets is not a Sphinx warning.
    warnings = [line for line in warnings if "IPKernelApp" not in line]
    assert done.returncode == 0 and not warnings, "\n".join(warnings) + "\n" + log[-6000:]
    return html


def _public_names() -> list[str]:
    names = [f"xent_jax.{name}" for name in xent_jax.__all__ if name != "analytic"]
    names += [f"xent_jax.analytic.{name}" for name in xent_jax.analytic.__all__]
    return names


@pytest.mark.slow
def test_every_public_name_has_an_entry_in_the_api_reference(site):
    page = (site / "api.html").read_text()
    anchors = set(re.findall(r'id="(xent_jax[\w.]*)"', page))
    missing = [name for name in _public_names() if name not in anchors]
    assert not missing, f"not in the API reference: {missing}"
    assert 'id="module-xent_jax.analytic"' in page
    # Each entry carries its docstring, not only a signature.
    for name in _public_names():
        body = page.split(f'id="{name}"', 1)[1].split("<dd>", 1)[1].split("</dd>", 1)[0]
        assert "<p>" in body, name


@pytest.mark.slow
def test_math_renders_offline(site):
    """MathJax is served from the site itself, not from a CDN."""
    mathjax = site / "_static" / "mathjax" / "tex-chtml.js"
    assert mathjax.is_file() and mathjax.stat().st_size > 100_000
    page = (site / "families" / "information.html").read_text()
    scripts = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', page)
    assert scripts == ["../_static/mathjax/tex-chtml.js"], scripts
    assert r"\log" in page  # the formulas reach the page for MathJax to typeset


@pytest.mark.slow
def test_pages_show_executed_outputs_and_the_research_figures(site):
    tutorial = (site / "tutorial.html").read_text()
    # The entropy of the fair coin and of the 75/25 forecast, printed by the executed cells.
    assert "fair coin, 50% / 50%       1.000 bits" in tutorial
    assert "England 75% / India 25%    0.811 bits" in tutorial
    # research/seed_examples.py's table of every article number and route, as a table.
    assert tutorial.count("<table") == 1 and "car after training: loss 0.095" in tutorial
    # The three figures that research/seed_examples.py draws, as images on the page.
    images = re.findall(r'<img[^>]*src="(_images/[^"]+\.png)"', tutorial)
    assert len(images) >= 3 and all((site / src).is_file() for src in images)
    # The benchmark summary's figure, drawn from BENCHMARKS.md's headline table.
    assert re.search(r'<img[^>]*src="_images/[^"]+\.png"', (site / "benchmarks.html").read_text())
    for page in ("index", "migrating", "families/softmax", "families/fused-sharded"):
        text = (site / f"{page}.html").read_text()
        assert 'class="cell_output' in text, page
    # No warning or traceback printed by a cell reaches a page.
    stderr = [p.name for p in site.rglob("*.html") if 'class="output stderr' in p.read_text()]
    assert not stderr, stderr


@pytest.mark.slow
def test_every_page_of_the_docs_folder_is_built(site):
    sources = [
        p.relative_to(ROOT / "docs").with_suffix("")
        for p in (ROOT / "docs").rglob("*")
        if p.suffix in {".md", ".rst"} and "_build" not in p.parts
    ]
    missing = [str(s) for s in sources if not (site / s).with_suffix(".html").is_file()]
    assert not missing, missing
