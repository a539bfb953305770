"""Run folders, the append-only metrics.jsonl channel, control requests and progress display."""
