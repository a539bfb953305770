"""Benchmark: the update's forward + backward on a vision-language workload, with the shared
prompt (`grouped_token_logprobs`: each group's prompt, images included, runs once and its KV
cache serves the G rollouts) against the plain pass (every row whole), side by side in one run,
as a ratio.

Run (alone: it uses the CPU fully; well under a minute with the defaults):
    .venv/bin/python benchmarks/vl_update.py [--image-px 256 --group-size 8 --prompts 4 --repeats 5]

Workload: the tiny Qwen3-VL (model/tiny_vl.py) with its processor allowing up to `--max-pixels`
pixels per image (default 256x256 = 64 image tokens, so the prompt is mostly image, as with real
VL prompts), the synthetic vision task's RL prompts with the zoom_in tool listed, G rollouts per
prompt of `--continuation` random tokens after the prompt (no sampling: the update's cost does not
depend on what was sampled), 2 torch threads, float32. Figures are medians over `--repeats`
timed repeats after one warm-up; both sides' log-probs are checked equal first.

Prints a few lines and one JSON line, and writes it to benchmarks/results/vl_update.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
RESULT_PATH = BENCHMARKS / "results" / "vl_update.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--continuation", type=int, default=24)
    parser.add_argument("--max-pixels", type=int, default=256 * 256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from metis_cli.data import synthetic_vl
    from metis_cli.data.chat import encode_text, render
    from metis_cli.model.loading import load_model, load_tokenizer
    from metis_cli.model.tiny_vl import build_tiny_vl_model
    from metis_cli.model.vision import load_vision
    from metis_cli.train.logprobs import grouped_token_logprobs, token_logprobs

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_vl_model(Path(tmp) / "model", max_pixels=args.max_pixels)
        model = load_model(str(folder), dtype=torch.float32, device="cpu").train()
        tokenizer = load_tokenizer(str(folder))
        vision = load_vision(str(folder), model=model)
        generator = torch.Generator().manual_seed(0)
        rows, images, prompt_lens = [], [], []
        for row in synthetic_vl.rl_prompts(args.prompts, seed=0):
            text = render(tokenizer, row["messages"], [synthetic_vl.ZOOM_IN_TOOL_SPEC], add_generation_prompt=True)
            prompt = vision.expand(encode_text(tokenizer, text), row["images"])[0]
            for _ in range(args.group_size):
                tail = torch.randint(10, 200, (args.continuation,), generator=generator).tolist()
                rows.append(prompt + tail)
                images.append(row["images"])
                prompt_lens.append(len(prompt))
        width = max(len(row) for row in rows)  # right-padded, as the trainer collates rollouts
        input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
        attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        lens = torch.tensor(prompt_lens)
        trained = (torch.arange(input_ids.shape[1])[None] >= lens[:, None]) & (attention_mask > 0)

        def plain():
            logp, _ = token_logprobs(model, input_ids, attention_mask, vision=vision, images=images)
            return logp * trained

        def grouped():
            return grouped_token_logprobs(model, input_ids, attention_mask, lens, vision=vision, images=images)[0]

        with torch.no_grad():
            difference = float((plain() - grouped()).abs().max())
        assert difference < 1e-4, f"shared-prompt log-probs differ from the plain pass by {difference}"

        def timed(fn) -> float:
            samples = []
            for repeat in range(args.repeats + 1):
                model.zero_grad(set_to_none=True)
                started = time.perf_counter()
                fn().sum().backward()
                if repeat:  # the first is a warm-up
                    samples.append(time.perf_counter() - started)
            return statistics.median(samples)

        times = {}
        for name, fn in (("plain", plain), ("shared_prompt", grouped), ("plain_again", plain)):
            times[name] = timed(fn)
    plain_s = statistics.mean([times["plain"], times["plain_again"]])
    result = {
        "benchmark": "vl_update", "rows": len(rows), "prompt_tokens": prompt_lens[0],
        "image_tokens": sum(t == vision.image_token_id for t in rows[0]), "continuation_tokens": args.continuation,
        "plain_s": round(plain_s, 4), "shared_prompt_s": round(times["shared_prompt"], 4),
        "ratio_shared_over_plain": round(times["shared_prompt"] / plain_s, 3), "max_logprob_difference": difference,
        "threads": args.threads,
    }
    print(f"{len(rows)} rows, prompt {prompt_lens[0]} tokens ({result['image_tokens']} image tokens), "
          f"{args.continuation} continuation tokens")
    print(f"plain forward+backward {plain_s:.3f} s, shared prompt {times['shared_prompt']:.3f} s: "
          f"ratio {result['ratio_shared_over_plain']:.2f}")
    print(json.dumps(result))
    RESULT_PATH.parent.mkdir(exist_ok=True)
    RESULT_PATH.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
