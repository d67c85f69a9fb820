"""Training: the recipe (`recipe.py`), the loop and its loss terms (`loop.py`), checkpoints and the run
folder (`checkpoint.py`), several processes (`parallel.py`), and the loss functions (`losses.py`).

Callers import from the modules; `loop.distill(cfg)` is the entry point.
"""
