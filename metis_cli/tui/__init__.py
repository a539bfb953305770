"""The Textual training dashboard (`metis watch`, `--tui`): charts, rollout browser, control keys.

It reads only the run folder (metrics.jsonl, rollouts/) and talks to the trainer only through
control files, so it never imports torch or transformers. Import `metis_cli.tui.app` or
`metis_cli.tui.launch` for the app; this package module stays empty so importing it is free.
"""
