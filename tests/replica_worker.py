"""Run under torchrun on 2 processes (tests/test_distributed.py): the ranks of one tensor-parallel
replica (`stages.hdpo_dist.Replicas` of size 2) see the first rank's tool results, and a
`LockstepBackend` lets a wave through only when both ranks send the same requests. Writes
FOLDER/report_<rank>.json (FOLDER: the first argument)."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from metis_cli.stages.hdpo_dist import LeaderTools, LockstepBackend, Replicas, own, place, share
from metis_cli.train.distributed import DistributedContext, DistributedError, consecutive_groups


class RankTools:
    """A registry whose results differ by rank (as a tool's timing or state can)."""

    def __init__(self, rank: int):
        self.rank, self.ran, self.ended = rank, 0, []

    def execute_many(self, calls, sessions=None, contexts=None):
        self.ran += len(calls)
        return [f"{call} on rank {self.rank}" for call, _ in calls]

    def end_session(self, session):
        self.ended.append(session)

    def specs(self):
        return ["calculator"]


class EchoBackend:
    def generate(self, prompts, params, **images):
        return [list(p) for p in prompts]


class Rollout:
    def __init__(self, prompt_index):
        self.prompt_index = prompt_index


def main() -> None:
    dist.init_process_group("gloo")
    context = DistributedContext.from_env()
    replicas = Replicas(context, 2, consecutive_groups(context, 2))
    registry = RankTools(context.rank)
    tools = LeaderTools(registry, replicas)
    results = tools.execute_many([("1+1", 0), ("2*3", 0)], sessions=[1, 2])
    tools.end_session(1)
    backend = LockstepBackend(EchoBackend(), replicas)
    same = backend.generate([[1, 2, 3]], "params")
    try:
        backend.generate([[1, 2, 3 + context.rank]], "params")
        mismatch = None
    except DistributedError as error:
        mismatch = str(error)
    mine = share(list(range(6)), replicas)
    trained = [r.prompt_index for r in own(place([Rollout(i) for i in range(len(mine))], replicas), replicas)]
    report = {"rank": context.rank, "results": results, "ran": registry.ran, "ended": registry.ended,
              "specs": tools.specs(), "same": same, "mismatch": mismatch, "share": mine, "trained": trained}
    # a file per rank: two ranks printing at once can interleave their lines on torchrun's stdout
    (Path(sys.argv[1]) / f"report_{context.rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
