"""Datasets and chat formatting: JSONL / parquet / verl-layout loaders, chat rendering with loss
masks, the synthetic task of the embedded default. Imports nothing from the rest of metis but
`errors`, `files` and `recipe` (it is below the agent, the model and the trainer)."""
