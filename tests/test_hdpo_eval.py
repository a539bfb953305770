"""The hdpo held-out eval reads a vision-language policy's eval images once per run (not at
every eval) and hands the engine the same images at every pass; each process reads only its
share; a text-only policy gets no images."""

from __future__ import annotations

import pytest

from metis_cli.rewards import batch
from metis_cli.stages import hdpo_dist
from metis_cli.stages.hdpo_eval import HeldOutEval
from metis_cli.stages.hdpo_dist import Replicas
from metis_cli.train.distributed import DistributedContext


class Prompt:
    """A held-out example whose image reads are counted."""

    def __init__(self, name: str):
        self.messages = [{"role": "user", "content": name}]
        self.reads = 0

    def load_images(self) -> list:
        self.reads += 1
        return [object()]  # a fresh object per read, as decoding a file gives


class Engine:
    """Records each greedy pass's prompts and images; answers nothing."""

    def __init__(self):
        self.calls: list[tuple[list, list | None]] = []

    def run(self, messages, group_size, *, greedy, images=None):
        assert group_size == 1 and greedy
        self.calls.append((messages, images))
        return []


@pytest.fixture(autouse=True)
def no_scoring(monkeypatch):
    """No judge and no other ranks: the eval's own part is what is tested."""
    monkeypatch.setattr(hdpo_dist, "gather", lambda dist, rollouts, scores: (rollouts, scores))
    monkeypatch.setattr(batch, "score_rollouts", lambda rollouts, examples, checker, reward, retries: [])
    monkeypatch.setattr(batch, "subset_summary", lambda rollouts, scores, examples: {"all": {"n": len(examples)}})


def passes(held_out: HeldOutEval, count: int) -> Engine:
    engine = Engine()
    for _ in range(count):
        assert held_out.summary(engine, checker=None, reward=None, retries=0) == {"all": {"n": 3}}
    return engine


def test_eval_images_are_read_once_and_the_same_objects_go_to_every_pass():
    prompts = [Prompt("a"), Prompt("b"), Prompt("c")]
    engine = passes(HeldOutEval(prompts, Replicas(DistributedContext()), with_images=True), 3)
    assert [p.reads for p in prompts] == [1, 1, 1]
    first = engine.calls[0][1]
    assert len(first) == 3 and all(len(row) == 1 for row in first)
    for messages, images in engine.calls[1:]:
        assert messages == [p.messages for p in prompts]
        assert [[id(i) for i in row] for row in images] == [[id(i) for i in row] for row in first]


def test_each_process_reads_only_its_share():
    prompts = [Prompt("a"), Prompt("b"), Prompt("c")]
    engine = passes(HeldOutEval(prompts, Replicas(DistributedContext(rank=1, world_size=2)), with_images=True), 2)
    assert [p.reads for p in prompts] == [0, 1, 0]
    assert [messages for messages, _ in engine.calls] == [[prompts[1].messages]] * 2


def test_a_text_only_policy_reads_no_images():
    prompts = [Prompt("a"), Prompt("b"), Prompt("c")]
    engine = passes(HeldOutEval(prompts, Replicas(DistributedContext()), with_images=False), 2)
    assert [p.reads for p in prompts] == [0, 0, 0]
    assert [images for _, images in engine.calls] == [None, None]
