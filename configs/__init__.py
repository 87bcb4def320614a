"""Configs of the research scripts: each module's ``get_config(arg=None)`` returns an
``ml_collections.ConfigDict`` (``--config configs/<name>.py[:arg]``)."""
