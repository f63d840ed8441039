"""Ovis2 for Xinference, served by transformers' native Ovis2 implementation.

Kept free of imports: ``ovis2_xinf._autoload`` is imported at every interpreter start.
"""

__version__ = "0.2.0"
