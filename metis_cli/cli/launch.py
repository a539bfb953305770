"""`--nproc-per-node N [--nnodes M --node-rank R --master-addr HOST --master-port P]`: metis
starts torchrun itself, which runs `python -m metis_cli <the same command>` once per process.

`torchrun ... -m metis_cli sft|hdpo RECIPE` works as well (torchrun then owns the launch and these
flags stay unset). One process, the default, never goes through here. When a process fails,
torchrun stops the others; `start` then says which rank died and how, and exits 2 when the
first rank to fail stopped on a user error (it printed the message), 1 otherwise. Never imports
torch at import time.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Annotated

import typer

from metis_cli.errors import MetisError

PANEL = "Several processes (torchrun)"
NprocOpt = Annotated[int, typer.Option(
    "--nproc-per-node", min=1, rich_help_panel=PANEL,
    help="Processes on this node, one per GPU (CPU: one per core); above 1 metis starts torchrun.")]
NnodesOpt = Annotated[int, typer.Option("--nnodes", min=1, rich_help_panel=PANEL, help="Nodes in the job.")]
NodeRankOpt = Annotated[int, typer.Option("--node-rank", min=0, rich_help_panel=PANEL,
                                          help="This node's index, 0 .. nnodes-1 (node 0 hosts the rendezvous).")]
MasterAddrOpt = Annotated[str | None, typer.Option("--master-addr", rich_help_panel=PANEL,
                                                   help="Host name or address of node 0 (needed with --nnodes > 1).")]
MasterPortOpt = Annotated[int, typer.Option("--master-port", min=1, max=65535, rich_help_panel=PANEL,
                                            help="Free TCP port on node 0 for the rendezvous.")]


@dataclass
class Launch:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500

    @property
    def wanted(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1

    def check(self) -> None:
        if self.wanted and under_torchrun():
            raise MetisError("--nproc-per-node/--nnodes start torchrun, but this process already runs under "
                             "torchrun: drop them (torchrun's own flags decide the processes)")
        if self.nnodes > 1 and not self.master_addr:
            raise MetisError(f"--nnodes {self.nnodes} needs --master-addr (the address of node 0, "
                             "reachable from every node) and the same --master-port on every node")
        if self.node_rank >= self.nnodes:
            raise MetisError(f"--node-rank {self.node_rank} is not below --nnodes {self.nnodes}: "
                             f"number the nodes 0 .. {self.nnodes - 1}")

    def torchrun_args(self) -> list[str]:
        args = ["--nproc-per-node", str(self.nproc_per_node)]
        if self.nnodes == 1 and not self.master_addr:
            return ["--standalone", *args]
        return [*args, "--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank),
                "--master-addr", self.master_addr or "127.0.0.1", "--master-port", str(self.master_port)]

    def argv(self) -> list[str]:
        """These flags again, for a child `metis` process (the --tui dashboard's trainer)."""
        if not self.wanted:
            return []
        flags = ["--nproc-per-node", str(self.nproc_per_node), "--nnodes", str(self.nnodes),
                 "--node-rank", str(self.node_rank), "--master-port", str(self.master_port)]
        return flags + (["--master-addr", self.master_addr] if self.master_addr else [])


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Rank 0, or no torchrun at all: the process that prints results."""
    return os.environ.get("RANK", "0") == "0"


def start(launch: Launch, metis_argv: list[str]) -> int:
    """Run `python -m metis_cli METIS_ARGV` under torchrun on this node; the job's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from metis_cli.cli.common import error_line

    if os.environ.get("METIS_DEBUG", "") in ("", "0"):
        import logging

        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # `describe_failure` says it once
    cores = os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // launch.nproc_per_node)))
    args = parse_args([*launch.torchrun_args(), "-m", "metis_cli", *metis_argv])
    try:
        run(args)
    except ChildFailedError as failed:
        rank, first = first_failure(failed.failures)
        if first.exitcode == MetisError.exit_code:
            return MetisError.exit_code  # a user error; that rank printed it
        error_line(describe_failure(failed.failures))
        return 1
    return 0


def first_failure(failures: dict):
    """(rank, ProcessFailure) of the process that failed first. Ranks torchrun stopped itself
    (SIGTERM) come last: they are the consequence, not the cause."""
    import signal

    def order(item):
        rank, failure = item
        return (failure.exitcode == -signal.SIGTERM, failure.timestamp, rank)

    return min(failures.items(), key=order)


def describe_failure(failures: dict) -> str:
    """One line naming the rank that failed first and how (torchrun's ProcessFailure records)."""
    rank, first = first_failure(failures)
    how = f"was killed by {first.signal_name()}" if first.exitcode < 0 else f"exited with code {first.exitcode}"
    others = sorted(r for r in failures if r != rank)
    tail = f"; ranks {others} stopped after it" if others else ""
    return (f"rank {rank} (local rank {first.local_rank}, pid {first.pid}) {how}{tail}. The job stopped; "
            "continue from the last checkpoint with --resume")


def exit_if_not_main() -> None:
    """Ranks other than 0 print nothing after training (rank 0 prints the result once)."""
    if not is_main_process():
        sys.stdout.flush()
        raise typer.Exit(0)
