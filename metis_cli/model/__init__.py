"""Models as every stage uses them: loading policies and tokenizers (`loading`), the tiny model the
embedded default builds from a config (`tiny`), and the process runtime (`runtime`: threads,
device, dtype, seeds).

Below `agent/` (backends load weights through it) and above `data/` (the tiny tokenizer is
trained on the synthetic task's text). It does not train anything; that is `train/`.
"""
