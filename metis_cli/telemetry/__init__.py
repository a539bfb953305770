"""Run folders, the append-only metrics.jsonl channel, control requests and progress display,
experiment trackers, and chat messages as readable text (message_text.py)."""
