"""Serving a whole family from one process through the OpenAI API (`boomerang serve`).

`family.py` holds the sizes (one copy of the teacher's and student's weights), `scheduler.py` batches
requests for the same size into one forward per step, `api.py` is the HTTP layer (FastAPI), `cli.py`
the command. See docs/serving.md.
"""
