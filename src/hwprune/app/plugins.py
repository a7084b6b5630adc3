"""``hwprune run --plugin FILE``: the one way user code enters a run.

A recipe is data: it names models, data sets and methods from registries and never code. A
plugin is a Python file the user names on the command line; it runs before the recipe is read
and registers what the recipe may then name::

    # my_models.py
    from hwprune.models import register_model
    from hwprune.app.datasets import register_dataset  # load(root, data, seed)
    from hwprune.methods import register_method        # a class decorator

    register_model("my_cnn", MyCNN)

``hwprune run my.yaml --plugin my_models.py`` (``model: {name: my_cnn}`` in the recipe).
"""

from __future__ import annotations

import runpy
import traceback
from pathlib import Path

from ..errors import ConfigError

__all__ = ["load_plugin"]


def load_plugin(spec: str) -> None:
    """Run the Python file ``spec``; any error in it becomes one line naming the file and line."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"--plugin {spec}: no such file; allowed: a Python file that "
                          "registers models, data sets or methods")
    try:
        runpy.run_path(str(path), run_name="hwprune_plugin")
    except Exception as e:  # the plugin's own code: any exception, named with its place
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if Path(f.filename).resolve() == path.resolve()]
        where = f", line {frames[-1].lineno}" if frames else ""
        raise ConfigError(f"--plugin {spec}{where}: {type(e).__name__}: "
                          f"{' '.join(str(e).split())}") from None
