"""metis: train tool-using LLM agents that know when not to call a tool (HDPO, arXiv 2604.08545)."""

__version__ = "0.1.0"
