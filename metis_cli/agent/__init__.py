"""The agent: tools the model may call, the tool-call parser, generation backends, the rollout engine."""
