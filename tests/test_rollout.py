"""In-process rollouts (vopd_megatron.rollout) on spawned gloo ranks, CPU, fp32.

- Sampling is the policy: at TP2 the empirical distribution of the first
  generated token (N draws of one prompt) passes a chi-square goodness-of-fit
  test against softmax(z / tau) of the model's own gathered logits over the
  true vocabulary, for tau = 1 and 0.7 and both backends, while the same draws
  are rejected against the wrong temperature (the test can fail). Padded
  vocabulary ids are never drawn.
- EOS / stop sequences / max length: a run with a stop condition equals the
  free run (same seed) cut after the first stop, stop token kept; rows that
  never stop are kept at max_new_tokens and flagged.
- The engine's log-probs equal the training forward's log p(a) at tau
  (`vocab_parallel_token_terms` over prompt + completion) within LOGPROB_TOL.
- Generate, then `forward_backward` (training/step.py): the gradient is
  bit-identical to the one computed before generating; training flags,
  InferenceMode and the RNG are restored; OnPolicyRolloutSource is
  deterministic under seek() and identical on every rank (TP2, and DP2).
- Alignment through the production path (collate -> Megatron forward ->
  loss): the trainer's log p of each completion token equals the engine's
  log-prob; the same log-probs moved one position either way do not.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from vopd_megatron.rollout import SamplingConfig, truncate
from vopd_megatron.rollout.sampler import warn_if_biased
from vopd_megatron.rollout.sampling import stop_position

TRUE_VOCAB, PADDED_VOCAB, SEQ = 50, 64, 32  # 14 padded columns: they must never be drawn
P_MIN = 1e-3  # chi-square acceptance level
LOGPROB_TOL = 1e-5  # fp32, KV-cached incremental forward vs full training forward
N_DRAWS = 8000


# --- helpers run inside the ranks ----------------------------------------------------


def _with_tp(tp, fn):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        return fn()
    finally:
        ps.destroy_model_parallel()


def _gather(local):
    """[..., V/tp] -> [..., V] over the TP group."""
    from megatron.core import parallel_state as ps

    pieces = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(pieces, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)


def _mask(s):
    return torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1)


def _model(seed, logit_std=1.5):
    """A tiny TP GPTModel whose logits at a probe prompt have std `logit_std` (not near-uniform)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        params_dtype=torch.float32, pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=PADDED_VOCAB, max_sequence_length=SEQ,
                     share_embeddings_and_output_weights=False)
    with torch.no_grad():
        z = _gather(model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], _mask(3)))[..., :TRUE_VOCAB]
        model.output_layer.weight.mul_(logit_std / z.std())
    return model


def _policy_logprobs(model, prompt, completion, tau):
    """Training side: log p(a) at tau from a full forward and vocab_parallel_token_terms."""
    from megatron.core import parallel_state as ps

    from vopd_megatron.loss import LossConfig, vocab_parallel_token_terms

    seq = prompt + completion
    s = len(seq) - 1
    local = model(torch.tensor([seq[:-1]]), torch.arange(s)[None], _mask(s))  # [1, s, V/tp]
    labels = torch.tensor([seq[1:]])
    loss_mask = torch.zeros(1, s)
    loss_mask[0, len(prompt) - 1 :] = 1
    config = LossConfig(mode="opd", temperature=tau)
    terms = vocab_parallel_token_terms(local, local.detach(), labels, loss_mask, config,
                                       vocab_size=TRUE_VOCAB, group=ps.get_tensor_model_parallel_group())
    return terms.logp[0, len(prompt) - 1 :].tolist()


# --- cases -------------------------------------------------------------------------------


def case_first_token_counts(seed, prompt, taus, n_draws):
    """Counts of the first sampled token per (backend, tau), and the reference softmax(z / tau)."""
    from vopd_megatron.rollout import RolloutSampler

    def run():
        model = _model(seed)
        with torch.no_grad():
            z = _gather(model(torch.tensor([prompt]), torch.arange(len(prompt))[None], _mask(len(prompt))))[0, -1]
        out = {"z": z[:TRUE_VOCAB].double()}
        for backend in ("engine", "loop"):
            for tau in taus:
                cfg = SamplingConfig(max_new_tokens=1, temperature=tau, backend=backend, max_batch_size=n_draws)
                first = [c.completion_ids[0] for c in RolloutSampler(model, cfg, TRUE_VOCAB).generate(
                    [prompt] * n_draws, seed=seed + 1)]
                out[backend, tau] = torch.bincount(torch.tensor(first), minlength=PADDED_VOCAB)
                out[backend, tau, "tokens"] = first
        return out

    return _with_tp(2, run)


LETTERS = "abcdefghij"


def letter_tokenizer(directory):
    """TRUE_VOCAB tokens: 10 letters and 40 letter pairs, decoded by plain
    concatenation, so one text has many segmentations (a stop string can be
    written with tokens other than its own encoding)."""
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from vopd_megatron.data import load_tokenizer

    words = list(LETTERS) + [a + b for a in LETTERS for b in LETTERS][:TRUE_VOCAB - len(LETTERS)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    path = os.path.join(directory, "letters.json")
    tok.save(path)
    return load_tokenizer(path)


def case_stop_strings(seed, backend, directory):
    """A free run, and the same seed with a stop string taken from row 0's text."""
    from vopd_megatron.rollout import RolloutSampler

    tokenizer = letter_tokenizer(directory)
    prompts = [[(7 * i + j) % TRUE_VOCAB for j in range(2 + i)] for i in range(6)]

    def run():
        model = _model(seed)
        base = dict(max_new_tokens=12, backend=backend, max_batch_size=4)
        free = RolloutSampler(model, SamplingConfig(**base), TRUE_VOCAB).generate(prompts, seed=5)
        text = tokenizer.decode(free[0].completion_ids)
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        cfg = SamplingConfig(**base, stop_strings=(stop,))
        sampler = RolloutSampler(model, cfg, TRUE_VOCAB, tokenizer=tokenizer)
        return dict(free=free, stop=stop, hints=sampler.config.stop_sequences,
                    with_stop=sampler.generate(prompts, seed=5))

    return _with_tp(2, run)


def case_stops_and_logprobs(seed, backend, tau):
    """Free run vs runs with EOS / stop sequence; engine log-probs vs the training forward's."""
    from vopd_megatron.rollout import RolloutSampler

    prompts = [[(7 * i + j) % TRUE_VOCAB for j in range(2 + i)] for i in range(6)]  # lengths 2..7

    def run():
        model = _model(seed)
        base = dict(max_new_tokens=12, temperature=tau, backend=backend, max_batch_size=4)  # 2 static batches
        free = RolloutSampler(model, SamplingConfig(**base), TRUE_VOCAB).generate(prompts, seed=5)
        # EOS: a token some rows produce and others do not.
        rows_with = torch.zeros(PADDED_VOCAB)
        for c in free:
            rows_with[list(set(c.completion_ids))] += 1
        rows_with[rows_with >= len(prompts)] = -1
        eos = int(rows_with.argmax())
        stop = tuple(free[0].completion_ids[3:5])
        with_eos = RolloutSampler(model, SamplingConfig(**base, eos_id=eos), TRUE_VOCAB).generate(prompts, seed=5)
        with_stop = RolloutSampler(model, SamplingConfig(**base, stop_sequences=(stop,)), TRUE_VOCAB).generate(
            prompts, seed=5)
        model.train()
        train_lp = [_policy_logprobs(model, p, c.completion_ids, tau) for p, c in zip(prompts, free)]
        return dict(free=free, eos=eos, with_eos=with_eos, stop=stop, with_stop=with_stop, train_lp=train_lp)

    return _with_tp(2, run)


def case_generate_then_train(tp):
    """forward_backward before and after generating; OnPolicyRolloutSource determinism."""
    from megatron.core import parallel_state as ps
    from megatron.core.inference.utils import InferenceMode

    from tests.test_train_step import SEQ as TRAIN_SEQ
    from tests.test_train_step import VOCAB, _setup, _teardown, _unwrap, my_microbatches, run_config
    from vopd_megatron.loss import LossConfig
    from vopd_megatron.rollout import OnPolicyRolloutSource, RolloutSampler
    from vopd_megatron.training.batch import collate
    from vopd_megatron.training.step import forward_backward, wire_megatron_hooks

    run = run_config(tp=tp)
    models = _setup(run)
    try:
        wire_megatron_hooks(models)
        student = _unwrap(models.student[0])
        batches = my_microbatches(run, dist.get_world_size())

        def grads():
            forward_backward(models, batches, run, LossConfig(mode="vopd"))
            return {n: p.main_grad.clone() for n, p in student.named_parameters()}

        before = grads()
        flags = [m.training for m in models.student[0].modules()]
        rng = torch.get_rng_state()
        sampler = RolloutSampler(models.student, SamplingConfig(max_new_tokens=6, eos_id=3), VOCAB,
                                 loss_mode="vopd")
        prompts = [[(11 * i + j) % VOCAB for j in range(2 + i % 3)] for i in range(5)]
        source = OnPolicyRolloutSource(sampler, prompts, seed=9)
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        first, second = source.take(4, dp, rank), source.take(4, dp, rank)  # this DP rank's block of 4
        state = dict(
            flags_restored=flags == [m.training for m in models.student[0].modules()],
            inference_mode_off=not InferenceMode.is_active(), rng_restored=torch.equal(rng, torch.get_rng_state()),
        )
        after = grads()
        grad_diff = max(float((after[n] - g).abs().max()) for n, g in before.items())
        source.seek(4)
        resumed = source.take(4, dp, rank)
        # A distillation step on the sampled rollouts, with the engine's log-probs for the correction.
        mine = first
        config = LossConfig(mode="vopd", rollout_correction="truncate")
        metrics = forward_backward(models, [collate(mine, TRAIN_SEQ)], run, config)
        # Alignment through the production path (collate -> Megatron forward ->
        # loss): the trainer's log p at each completion position against the
        # engine's log-prob of that token; then with the engine's log-probs moved
        # one position late / early, the error an off-by-one would make.
        def abs_gap(step_metrics):
            total, count = step_metrics[0]["rollout_logprob_abs_gap"]
            return float(total / count)

        def moved(r, k):
            lp = r.logprobs[-k:] + r.logprobs[:-k]  # roll by k within the completion
            return dataclasses.replace(r, logprobs=lp)

        longer = [r for r in mine if len(r.completion_ids) >= 2]
        gaps = {"aligned": abs_gap(metrics)}
        for name, k in (("late", 1), ("early", -1)):
            gaps[name] = abs_gap(forward_backward(models, [collate([moved(r, k) for r in longer], TRAIN_SEQ)],
                                                  run, config))
        return dict(state, dp=dp, grad_diff=grad_diff, grad_norm=max(float(g.abs().max()) for g in before.values()),
                    first=first, second=second, resumed=resumed, consumed=source.consumed,
                    losses=[float(m["loss"][0]) for m in metrics], gaps=gaps)
    finally:
        _teardown()


# --- statistics ---------------------------------------------------------------------------


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Goodness-of-fit p-value of `counts` against `probs`; bins expecting < min_expected are pooled."""
    counts, probs = counts.double(), probs.double() / probs.sum()
    expected = probs * counts.sum()
    rare = expected < min_expected
    obs = torch.cat([counts[~rare], counts[rare].sum()[None]])
    exp = torch.cat([expected[~rare], expected[rare].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


# --- tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool2(gloo_pools):
    if torch.cuda.is_available():
        pytest.skip("CPU/gloo test (cpu_compat is off with CUDA)")
    return gloo_pools(2)


def test_chi_square_helper_accepts_and_rejects():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(40, generator=g) * 1.5, 0)
    counts = torch.bincount(torch.multinomial(probs, 8000, replacement=True, generator=g), minlength=40)
    assert chi_square_p(counts, probs) > P_MIN
    assert chi_square_p(counts, torch.softmax(torch.log(probs) / 0.7, 0)) < P_MIN


def test_first_token_matches_softmax_over_tau(pool2):
    taus = (1.0, 0.7)
    r0, r1 = pool2.run(case_first_token_counts, 3, [5, 17, 33, 2], taus, N_DRAWS)
    z = r0["z"]
    for backend in ("engine", "loop"):
        for tau in taus:
            counts = r0[backend, tau]
            assert r0[backend, tau, "tokens"] == r1[backend, tau, "tokens"], "TP ranks drew different tokens"
            assert counts[TRUE_VOCAB:].sum() == 0, "a padded vocabulary id was sampled"
            counts = counts[:TRUE_VOCAB]
            p = chi_square_p(counts, torch.softmax(z / tau, 0))
            assert p > P_MIN, f"{backend} tau={tau}: chi-square p={p:.2e} against softmax(z/tau)"
            wrong = 0.7 if tau == 1.0 else 1.0  # the test has power: the wrong temperature is rejected
            p_wrong = chi_square_p(counts, torch.softmax(z / wrong, 0))
            assert p_wrong < P_MIN, f"{backend} tau={tau}: sampling at tau={wrong} not rejected (p={p_wrong:.2e})"
            print(f"\n{backend} tau={tau}: chi-square p={p:.3f}; against tau={wrong}: p={p_wrong:.1e}")
    # Equal-length prompts: both backends draw from the same generator over the same logits.
    for tau in taus:
        same = sum(a == b for a, b in zip(r0["engine", tau, "tokens"], r0["loop", tau, "tokens"]))
        assert same / N_DRAWS > 0.99


@pytest.mark.parametrize("backend,tau", [("engine", 1.0), ("engine", 0.7), ("loop", 0.7)])
def test_eos_stop_max_length_and_logprobs(pool2, backend, tau):
    r0, r1 = pool2.run(case_stops_and_logprobs, 4, backend, tau)
    assert r0["free"] == r1["free"] and r0["with_eos"] == r1["with_eos"], "TP ranks disagree"
    free = r0["free"]
    assert all(c.hit_max_length and len(c.completion_ids) == 12 for c in free)
    for name, cfg in (("with_eos", SamplingConfig(12, eos_id=r0["eos"])),
                      ("with_stop", SamplingConfig(12, stop_sequences=(r0["stop"],)))):
        expected = [truncate(c.completion_ids, c.logprobs, cfg) for c in free]
        got = r0[name]
        assert [c.completion_ids for c in got] == [c.completion_ids for c in expected], name
        assert [c.hit_max_length for c in got] == [c.hit_max_length for c in expected], name
        flags = [c.hit_max_length for c in got]
        assert any(flags) and not all(flags), f"{name}: the test needs rows that stop and rows that do not"
        for g, e in zip(got, expected):
            assert max(abs(a - b) for a, b in zip(g.logprobs, e.logprobs)) < 1e-6
            if not g.hit_max_length:
                assert len(g.completion_ids) < 12
    assert all(c.completion_ids[-1] == r0["eos"] for c in r0["with_eos"] if not c.hit_max_length)
    gap = max(abs(a - b) for c, lp in zip(free, r0["train_lp"]) for a, b in zip(c.logprobs, lp))
    print(f"\n{backend} tau={tau}: max |engine log-prob - training log p| = {gap:.2e}")
    assert gap < LOGPROB_TOL


@pytest.mark.parametrize("backend", ["engine", "loop"])
def test_stop_strings_cut_the_decoded_text(pool2, backend, tmp_path):
    r0, r1 = pool2.run(case_stop_strings, 4, backend, str(tmp_path))
    assert r0["with_stop"] == r1["with_stop"], "TP ranks disagree"
    tok = letter_tokenizer(str(tmp_path))
    stop = r0["stop"]
    # Word-level encoding reads the unsplit string as one unknown word: its
    # "encoding" does not decode to the string, so no token hint is added and
    # the stop rests on the text match alone.
    assert stop not in tok.decode(tok.encode(stop, add_special_tokens=False)) and r0["hints"] == ()
    cfg = SamplingConfig(12, stop_strings=(stop,))
    for free, got in zip(r0["free"], r0["with_stop"]):
        # Expected from the free run, by the plain definition: the shortest
        # token prefix whose text contains the stop string.
        text = tok.decode(free.completion_ids)
        if stop in text:
            n = next(n for n in range(1, 13) if stop in tok.decode(free.completion_ids[:n]))
            assert got.completion_ids == free.completion_ids[:n] and not got.hit_max_length
            assert tok.decode(got.completion_ids).find(stop) >= 0
        else:
            assert got.completion_ids == free.completion_ids and got.hit_max_length
        assert got.logprobs == pytest.approx(free.logprobs[: len(got.logprobs)], abs=1e-6)
        assert truncate(free.completion_ids, free.logprobs, cfg, tok.decode).completion_ids == got.completion_ids
    flags = [c.hit_max_length for c in r0["with_stop"]]
    assert not flags[0] and any(flags), "the test needs rows that stop and rows that do not"


@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_generate_then_train_step(pool2, tp):
    results = pool2.run(case_generate_then_train, tp)
    for r in results:
        assert r["flags_restored"] and r["inference_mode_off"] and r["rng_restored"]
        assert r["grad_norm"] > 0 and r["grad_diff"] == 0.0, f"gradient changed by {r['grad_diff']}"
        assert r["resumed"] == r["second"], "seek() did not reproduce the rollouts"
        assert r["first"] != r["second"] and r["consumed"] == 8
        assert all(len(x.completion_ids) == len(x.logprobs) >= 1 for x in r["first"])
    if tp == 2:  # one DP rank: both TP ranks sample the same block with the same seed
        assert results[0]["first"] == results[1]["first"], "TP ranks returned different rollouts"
    else:  # DP 2: each rank samples only its own half of the 4
        assert [len(r["first"]) for r in results] == [2, 2] and results[0]["first"] != results[1]["first"]
    losses = [x for r in results for x in r["losses"]]
    assert losses and all(x == x for x in losses)
    # Logits at position t are scored against token t+1, on completion tokens
    # only: the trainer reproduces the engine's log-probs (fp32), and a one-
    # position shift either way is visible in the same metric.
    for r in results:
        assert r["gaps"]["aligned"] < LOGPROB_TOL, r["gaps"]
        assert r["gaps"]["late"] > 100 * LOGPROB_TOL and r["gaps"]["early"] > 100 * LOGPROB_TOL, r["gaps"]
    # Max length: a completion that reaches max_new_tokens (6) without EOS (3)
    # is flagged, and kept: every one of its tokens is in the loss mask.
    from tests.test_train_step import SEQ as TRAIN_SEQ
    from vopd_megatron.rollout.types import rollout_totals
    from vopd_megatron.training.batch import collate

    rollouts = results[0]["first"] + results[0]["second"]
    for r in rollouts:
        assert r.hit_max_length == (len(r.completion_ids) == 6 and 3 not in r.completion_ids)
    hit = [r for r in rollouts if r.hit_max_length]
    assert hit, "the test needs a completion that hits the limit"
    mb = collate(hit, TRAIN_SEQ)
    for i, r in enumerate(hit):
        assert mb["loss_mask"][i].sum() == 6
        assert mb["labels"][i][mb["loss_mask"][i] != 0].tolist() == r.completion_ids
    totals = rollout_totals(rollouts)
    assert totals["rollout/hit_max_length"] == (len(hit), len(rollouts))
    assert totals["rollout/completion_tokens"] == (sum(len(r.completion_ids) for r in rollouts), len(rollouts))


def case_pipeline_sampling(tp, pp, student_dir):
    """Completions of the test_train_step student (loaded from a TP1·PP1 checkpoint) at TP x PP."""
    from tests.test_train_step import VOCAB, _load, _setup, _teardown, run_config
    from vopd_megatron.rollout import RolloutSampler

    models = _setup(run_config(tp, pp))
    try:
        _load(models.student[0], student_dir)
        sampler = RolloutSampler(models.student, SamplingConfig(max_new_tokens=6, temperature=0.8, eos_id=3,
                                                                max_batch_size=2), VOCAB)
        out = sampler.generate([[1, 2, 3], [4, 5], [7, 8, 9, 10], [11]], seed=3)
        return [(c.completion_ids, c.logprobs, c.hit_max_length) for c in out]
    finally:
        _teardown()


def test_pipeline_parallel_sampling_equals_pp1(gloo_pools, pool2, tmp_path):
    """PP2 (the controller's pipeline path: stage-to-stage activations, last
    stage's logits broadcast, every stage draws) samples exactly what PP1 does
    on the same weights, on both stages."""
    from tests.test_train_step import make_initial_weights

    student_dir, teacher_dir = tmp_path / "student", tmp_path / "teacher"
    student_dir.mkdir(), teacher_dir.mkdir()
    gloo_pools(1).run(make_initial_weights, str(student_dir), str(teacher_dir))
    pp1 = pool2.run(case_pipeline_sampling, 1, 1, str(student_dir))  # two DP ranks, same prompts
    pp2 = pool2.run(case_pipeline_sampling, 1, 2, str(student_dir))
    assert pp1[0] == pp1[1] and pp2[0] == pp2[1], "ranks disagree"
    assert [c[0] for c in pp2[0]] == [c[0] for c in pp1[0]]
    for (_, lp2, hit2), (_, lp1, hit1) in zip(pp2[0], pp1[0]):
        assert hit2 == hit1 and max(abs(a - b) for a, b in zip(lp2, lp1)) < 1e-6


# --- single-process units -----------------------------------------------------------------


def test_truncate_keeps_stop_token_and_flags_max_length():
    cfg = SamplingConfig(max_new_tokens=5, eos_id=9, stop_sequences=((4, 5),))
    assert truncate([1, 9, 2], [0.1, 0.2, 0.3], cfg).completion_ids == [1, 9]
    c = truncate([1, 4, 5, 9, 2], [0.0] * 5, cfg)
    assert (c.completion_ids, c.hit_max_length) == ([1, 4, 5], False)
    c = truncate([1, 2, 3, 4, 6, 7], [0.0] * 6, cfg)
    assert (c.completion_ids, c.hit_max_length) == ([1, 2, 3, 4, 6], True)
    assert stop_position([4], None, ((4, 5),)) is None


def test_stop_string_token_hints(tmp_path):
    from vopd_megatron.rollout.sampling import with_stop_string_hints

    tok = letter_tokenizer(str(tmp_path))
    ab = tok.encode("ab", add_special_tokens=False)
    assert len(ab) == 1 and tok.decode(ab) == "ab"
    cfg = with_stop_string_hints(SamplingConfig(4, stop_sequences=((3,),), stop_strings=("ab", "abc")), tok)
    assert cfg.stop_sequences == ((3,), tuple(ab))  # "abc" encodes to <unk>: no hint


def test_stop_string_inside_and_across_tokens():
    vocab = ["a", "b", "</", "ans", "wer>", "</answer>", "x</answer>y", "!"]
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    cfg = SamplingConfig(max_new_tokens=6, eos_id=7, stop_strings=("</answer>",))
    # written across three tokens: cut after the one that completes it
    assert truncate([0, 2, 3, 4, 1, 1], [0.0] * 6, cfg, decode).completion_ids == [0, 2, 3, 4]
    # inside one token: the whole token is kept (tokens are never split)
    c = truncate([1, 6, 0, 0, 0, 0], [0.0] * 6, cfg, decode)
    assert (c.completion_ids, c.hit_max_length) == ([1, 6], False)
    # EOS first: EOS wins; no stop at all: kept whole and flagged
    assert truncate([0, 7, 5, 0], [0.0] * 4, cfg, decode).completion_ids == [0, 7]
    c = truncate([0, 1, 0, 1, 0, 1], [0.0] * 6, cfg, decode)
    assert (len(c.completion_ids), c.hit_max_length) == (6, True)
    with pytest.raises(ValueError, match="decode"):
        truncate([0], [0.0], cfg)
    with pytest.raises(ValueError):
        SamplingConfig(max_new_tokens=4, stop_strings=("",))


def test_sampling_config_validation():
    for bad in (dict(max_new_tokens=0), dict(max_new_tokens=4, temperature=0),
                dict(max_new_tokens=4, top_k=3, top_p=0.5), dict(max_new_tokens=4, backend="vllm"),
                dict(max_new_tokens=4, top_k=5, backend="loop"), dict(max_new_tokens=4, stop_sequences=((),))):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_filtered_sampling_with_sampled_loss_warns_loudly(capsys):
    with pytest.warns(UserWarning, match="biased"):
        warn_if_biased(SamplingConfig(max_new_tokens=4, top_k=20), "vopd")
    assert "biased" in capsys.readouterr().out
    warn_if_biased(SamplingConfig(max_new_tokens=4), "vopd")  # unfiltered: silent
    warn_if_biased(SamplingConfig(max_new_tokens=4, top_p=0.9), "full_kl")  # no score-function estimator
    assert capsys.readouterr().out == ""
