"""Evaluation of a whole family. `run.py` orchestrates (`evaluate_student(EvalRequest)`); the others serve it:

- `metrics.py`: what is measured on one model (lm-eval tasks, label-free metrics, cost);
- `task_files.py`: local evaluation files (.jsonl) as lm-eval tasks;
- `results.py`: one file per finished (model, task) cell, and the results table;
- `chart.py`: size-vs-score charts with the Pareto frontier.
"""
