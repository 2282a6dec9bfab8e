"""The fine-tuning loop and its parts: optimizer and schedules, checkpoints, memory, EMA, run log, evaluation."""
