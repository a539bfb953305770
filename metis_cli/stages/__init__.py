"""The stages a recipe runs (curate, sft, hdpo, eval, chat): each is setup / train / save /
cleanup, wiring the packages below it. Only `cli/` imports this package."""
