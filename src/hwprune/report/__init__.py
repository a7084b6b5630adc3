"""Reporting: what a pruned model gained, measured (``measure``: MACs, kept fractions,
parameters), accounted (``accounting``: stored bytes, index overhead, decoding cost), held
(``result``: ``Report``, ``LayerRow``), rendered (``render``: Markdown, terminal, JSON) and
drawn (``plots``).

``plots`` needs matplotlib and is imported only when used.
"""

from .measure import Report, report, report_state_dict, weights_of

__all__ = ["Report", "report", "report_state_dict", "weights_of"]
