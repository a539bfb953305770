"""Typer commands: flags -> recipe -> `stages.<x>.run()`.

Importing this package must not import torch, transformers, vllm or datasets: shell completion
re-runs `metis` on every Tab, and `metis --help` must be instant. Stage modules are imported
inside command bodies.
"""
