"""A run's state and records: the built experiment and its checks, the progress a checkpoint
saves, the one row builder, summary.json, console, metrics.jsonl and wandb."""
