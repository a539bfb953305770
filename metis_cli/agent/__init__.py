"""The agent: tools the model may call, the tool-call parser, generation backends (one
`SamplingParams` protocol, agent/backend.py), the rollout engine and its two schedules, and
`factory.build_agent`, which wires model, backend, tools and engine for every stage."""
