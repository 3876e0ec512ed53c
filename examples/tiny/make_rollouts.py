"""Write examples/tiny/rollouts.jsonl: 64 random tokenized rollouts for the tiny run.

Stand-in data for the file-backed RolloutSource (the in-process sampler comes
with the rollout engine): prompts of 4-12 tokens, completions of 8-40 tokens
over a vocabulary of 250, fixed seed.

    python examples/tiny/make_rollouts.py
"""
import json
import random
from pathlib import Path

rng = random.Random(0)
out = Path(__file__).with_name("rollouts.jsonl")
with out.open("w") as f:
    for _ in range(64):
        prompt = [rng.randrange(1, 250) for _ in range(rng.randint(4, 12))]
        completion = [rng.randrange(1, 250) for _ in range(rng.randint(8, 40))]
        f.write(json.dumps({"prompt_ids": prompt, "completion_ids": completion}) + "\n")
print(f"wrote {out}")
