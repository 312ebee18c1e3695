"""Training: the loop (loop.py), evaluation (evaluate.py), and the hooks schedules act through (hooks.py)."""
