"""hwprune's error types.

Every error a user can cause is a ``HwpruneError`` (a ``ValueError``), raised early, with a
message that names the layer, field or value at fault and says what is allowed.
"""


class HwpruneError(ValueError):
    """Base class of hwprune's errors: bad input named with what is allowed."""


class StructureError(HwpruneError):
    """A structure name or object is unknown, malformed, or does not fit a layer."""


class TargetError(HwpruneError):
    """The ``targets=`` selection is empty, unknown, or names something that cannot be pruned."""


class ConfigError(HwpruneError):
    """A method parameter (sparsity, schedule, scope, ...) is outside its allowed values."""


class LifecycleError(HwpruneError):
    """A pruner was used out of order (e.g. ``step()`` after ``finalize()``)."""
