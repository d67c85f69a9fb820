"""Celery workers: one per GPU (or one on CPU), taking job ids from Redis and running the library.

The database, not the queue, says what state a job is in. A worker claims a job atomically before
running it, beats a heartbeat while it runs, and sweeps for jobs whose worker died; see runner.py.
"""
