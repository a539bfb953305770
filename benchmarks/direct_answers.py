"""How sure a tiny text model is of the easy sums it should answer without the calculator.

For every one of the 100 easy questions of `recipes/tiny.yaml` ("What is 6 + 8?", rendered with
the task's system prompt and calculator spec, as in training), teacher-forced in one forward pass:
- `p_direct`: the probability of the exact right answer (`14</answer>`) given the prompt and an
  opening `<answer>`, i.e. how often the model is right *when it answers directly*;
- `p_tool_first`: the probability that its first token opens a tool call.

The held-out greedy eval only says whether the most likely answer is right; `p_direct` shows the
margin behind it, so a policy that is about to lose a sum (p_direct falling towards 0.5) shows up
before its greedy accuracy falls. The README's analysis of issue 18 (RL erodes the direct answers
after the tool calls are gone) comes from here.

Run:    .venv/bin/python benchmarks/direct_answers.py MODEL_DIR [MODEL_DIR ...] [--json OUT]
Output: one line per model (mean and min p_direct, sums below 0.9 and 0.5, the five least sure,
        mean p_tool_first); --json writes every figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EASY_SUMS = [(left, right) for left in range(10) for right in range(10)]


def direct_answer_figures(model, tokenizer) -> list[dict]:
    """One dict per easy sum: question, answer, p_direct, p_tool_first (see the module docstring)."""
    import torch

    from metis_cli.data.chat import encode_text, prompt_ids
    from metis_cli.data.synthetic import CALCULATOR_TOOL_SPEC, SYSTEM_PROMPT, answer_text

    opening = encode_text(tokenizer, "<answer>")
    tool_first = encode_text(tokenizer, "<tool_call>")[0]
    figures = []
    for left, right in EASY_SUMS:
        question = f"What is {left} + {right}?"
        prompt = prompt_ids(tokenizer, [{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": question}], [CALCULATOR_TOOL_SPEC])
        answer = encode_text(tokenizer, answer_text(str(left + right)))
        if answer[:len(opening)] != opening:
            raise ValueError(f"the tokenizer splits {answer_text(str(left + right))!r} across '<answer>'")
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            log_probs = model(ids).logits[0].float().log_softmax(-1)
        start = len(prompt) + len(opening)  # position of the answer's first token after <answer>
        answer_log_p = sum(log_probs[position - 1, ids[0, position]].item()
                           for position in range(start, ids.shape[1]))
        figures.append({"question": question, "answer": str(left + right),
                        "p_direct": float(torch.tensor(answer_log_p).exp()),
                        "p_tool_first": float(log_probs[len(prompt) - 1, tool_first].exp())})
    return figures


def summary(figures: list[dict]) -> dict:
    p = [f["p_direct"] for f in figures]
    least = sorted(figures, key=lambda f: f["p_direct"])[:5]
    return {"p_direct_mean": sum(p) / len(p), "p_direct_min": min(p),
            "below_0.9": sum(x < 0.9 for x in p), "below_0.5": sum(x < 0.5 for x in p),
            "least_sure": [(f["question"], round(f["p_direct"], 3)) for f in least],
            "p_tool_first_mean": sum(f["p_tool_first"] for f in figures) / len(figures)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="model folders (an SFT or hdpo final/, a checkpoint)")
    parser.add_argument("--json", type=Path, help="write every figure of every model here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores this process may use)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metis_cli.host import available_cores

    torch.set_num_threads(args.threads or available_cores())
    results = {}
    for folder in args.models:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        figures = direct_answer_figures(model, AutoTokenizer.from_pretrained(folder))
        results[str(folder)] = {"summary": summary(figures), "sums": figures}
        s = results[str(folder)]["summary"]
        print(f"{folder}: p_direct mean {s['p_direct_mean']:.4f} min {s['p_direct_min']:.4f}, "
              f"{s['below_0.9']} below 0.9, {s['below_0.5']} below 0.5; least sure {s['least_sure']}; "
              f"p_tool_first mean {s['p_tool_first_mean']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
