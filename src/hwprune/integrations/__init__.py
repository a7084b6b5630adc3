"""Callbacks that run a pruner inside the training loops people already have.

- ``hwprune.integrations.lightning.PruningCallback``: a PyTorch Lightning ``Callback``
  (docs/integrations-lightning.md; needs ``hwprune[lightning]``);
- ``hwprune.integrations.transformers.PruningCallback``: a Hugging Face ``TrainerCallback``
  (docs/integrations-transformers.md; needs ``hwprune[transformers]``).

Importing this package imports neither framework: each submodule imports its own when it is
imported, and ``import hwprune`` never imports this package. ``lifecycle`` holds what both share
(``Finish``: what to do when fitting ends).
"""

from .lifecycle import Finish, Finished, MethodChoice

__all__ = ["Finish", "Finished", "MethodChoice"]
