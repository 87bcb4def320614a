"""The language-model research script's parts: data, model, training loop, report."""
