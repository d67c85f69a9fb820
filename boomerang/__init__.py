"""Boomerang Studio: build, measure and serve a whole family of model sizes from one teacher LLM.

The library (this package): the engine at the top level (torch, transformers, gguf), `training/`,
and `evaluation/` (which also uses lm-eval, plotly and matplotlib). The worker, database and
dashboard layers call into it and never the other way round (docs/architecture.md).
"""

__version__ = "0.1.0"
