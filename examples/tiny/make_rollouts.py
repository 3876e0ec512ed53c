"""Write examples/tiny/rollouts.jsonl and prompts.jsonl: 64 random tokenized
prompts (4-12 tokens) over a vocabulary of 250, fixed seed; the rollouts add
random 8-40-token completions, as an external sampler's output would.

prompts.jsonl feeds the on-policy run (the student samples the completions);
rollouts.jsonl the file-backed RolloutSource (--rollout-data).

    python examples/tiny/make_rollouts.py
"""
import json
import random
from pathlib import Path

rng = random.Random(0)
out = Path(__file__).with_name("rollouts.jsonl")
prompts_out = out.with_name("prompts.jsonl")
with out.open("w") as f, prompts_out.open("w") as g:
    for _ in range(64):
        prompt = [rng.randrange(1, 250) for _ in range(rng.randint(4, 12))]
        completion = [rng.randrange(1, 250) for _ in range(rng.randint(8, 40))]
        f.write(json.dumps({"prompt_ids": prompt, "completion_ids": completion}) + "\n")
        g.write(json.dumps({"prompt_ids": prompt}) + "\n")
print(f"wrote {out} and {prompts_out}")
