"""Boomerang Studio: build, measure and serve a whole family of model sizes from one teacher LLM.

The library (this package) depends on torch and transformers only; the worker, database and
dashboard layers call into it and never the other way round.
"""

__version__ = "0.1.0"
