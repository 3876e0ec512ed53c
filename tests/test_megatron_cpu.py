"""Megatron-Core's tensor/pipeline-parallel code on CPU (gloo) via `cpu_compat`.

Each distributed case runs on every rank of a spawned gloo pool (the ranks call
`cpu_compat.enable()` before joining the group), sets up and tears down its own
model-parallel state, and compares a parallel run with a plain single-rank run
of the same weights and batch:

- TP2 GPTModel vs TP1: logits (gathered), loss, every parameter gradient;
- PP2 and TP2xPP2 1F1B schedules vs one stage: per-microbatch losses, gradients;
- Megatron DDP + optimizer (plain, distributed) at DP2 vs one `torch.optim.AdamW`
  step on the full batch;
- RNG tracker streams, recompute with dropout, `broadcast_data`, the static
  inference engine's greedy output, and the `torch.cuda` stand-ins.

References are built with a different seed and their weights copied in, so
agreement comes from the computation, not from matching initialisations.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

VOCAB, SEQ, HIDDEN, HEADS, MICRO_BATCH = 128, 32, 64, 4, 2
TOL = 1e-5  # max abs error, fp32: same weights, different reduction orders


# --- helpers shared by the cases (run inside the ranks) --------------------------------


def _config(tp=1, pp=1, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32, params_dtype=torch.float32,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        batch_p2p_comm=False,  # MEGATRON_ON_CPU.md trap 2
    )
    return TransformerConfig(**{**fields, **overrides})


def _gpt(config, seed, tied=False):
    """A GPTModel for this rank's pipeline stage, initialised from `seed`."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return GPTModel(
        config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tied,
    )


def _batch(index):
    """Microbatch `index`: the same tokens on every rank."""
    g = torch.Generator().manual_seed(1000 + index)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=g)
    positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
    return dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], position_ids=positions)


def _model_loss(model, batch):
    """Mean next-token loss from Megatron's own (vocab-parallel) loss path."""
    # attention_mask=None: the local spec builds its default causal mask.
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()


def _snapshot(model):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
    )


def _tp_shard(full, param):
    """This rank's piece of a full (TP1) tensor, laid out like the TP-sharded `param`."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp = ps.get_tensor_model_parallel_world_size()
    return full.chunk(tp, dim=param.partition_dim)[ps.get_tensor_model_parallel_rank()]


def _max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _with_model_parallel(tp, pp, fn):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    try:
        return fn()
    finally:
        ps.destroy_model_parallel()


# --- cases (module-level so spawned ranks can import them) -------------------------------


def case_enable_is_idempotent():
    from megatron.core import tensor_parallel

    from vopd_megatron.megatron import cpu_compat

    before = tensor_parallel.broadcast_data
    again = cpu_compat.enable()
    return dict(
        active=cpu_compat.is_active(), again=again,
        not_rewrapped=tensor_parallel.broadcast_data is before,
        current_device=str(torch.cuda.current_device()),
    )


def case_cuda_standins():
    """Streams, events and synchronize as DDP, p2p and Megatron's timers call them."""
    from megatron.core.timers import Timers

    timers = Timers(log_level=2, log_option="minmax")
    timers("step", log_level=0).start(barrier=True)  # torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    side = torch.cuda.Stream(device=torch.cuda.current_device())
    start.record()
    with torch.cuda.stream(side):
        x = torch.ones(3, device=torch.cuda.current_device())
        time.sleep(0.02)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.default_stream().wait_stream(side)
    end.record()
    end.synchronize()
    timers("step").stop(barrier=True)
    timer_s = timers("step").elapsed(reset=False)
    # min/max over ranks: an all-gather into a buffer on torch.cuda.current_device()
    summary = timers.get_all_timers_string(["step"], barrier=True)
    return dict(event_ms=start.elapsed_time(end), timer_s=timer_s, device=x.device.type, summary=summary)


def case_torch_compile():
    """Dynamo traces with the stand-ins installed (it keys handlers by function identity)."""
    compiled = torch.compile(lambda x: torch.softmax(x, dim=-1) * 2, backend="eager")
    x = torch.randn(3, 5)
    return torch.equal(compiled(x), torch.softmax(x, dim=-1) * 2)


def case_broadcast_data():
    """`broadcast_data` (uses `.cuda()` and device="cuda") from TP rank 0 to rank 1."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import broadcast_data

    def run():
        sent = {"a": torch.arange(6).view(2, 3), "b": torch.tensor([7, 8, 9, 10])}
        data = sent if ps.get_tensor_model_parallel_rank() == 0 else {}
        got = broadcast_data(["a", "b"], data, torch.int64)
        return all(torch.equal(got[k], sent[k]) for k in sent)

    return _with_model_parallel(2, 1, run)


def case_rng_tracker(seed):
    """The tracker's default stream is shared across TP ranks, its TP stream is per rank."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def run():
        model_parallel_cuda_manual_seed(seed)
        before = torch.rand(4)
        with get_cuda_rng_tracker().fork():
            tp_draw = torch.rand(4)
        after = torch.rand(4)
        model_parallel_cuda_manual_seed(seed)
        plain = torch.rand(8)  # the default stream, with no fork in between
        return dict(
            tp_draw=tp_draw,
            fork_restores=torch.equal(torch.cat([before, after]), plain),
            default=before,
        )

    return _with_model_parallel(2, 1, run)


def case_tp2_matches_tp1(seed):
    """Logits, loss and all gradients of a TP2 GPTModel equal those of the TP1 model."""
    from megatron.core import parallel_state as ps

    batch = _batch(0)

    def reference():
        model = _gpt(_config(), seed)
        logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, V]
        loss = _model_loss(model, batch)
        loss.backward()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1))
        return logits.detach(), loss.detach(), ce.detach(), *_snapshot(model)

    ref_logits, ref_loss, torch_ce, ref_params, ref_grads = _with_model_parallel(1, 1, reference)

    def sharded():
        model = _gpt(_config(tp=2), seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(_tp_shard(ref_params[name], p))
        local = model(batch["tokens"], batch["position_ids"], None)  # [b, s, V/tp]
        pieces = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(pieces, local.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
        loss = _model_loss(model, batch)
        loss.backward()
        errors = {
            "logits": _max_err(torch.cat(pieces, dim=-1), ref_logits),
            "loss": _max_err(loss.detach(), ref_loss),
            "tp1_loss_vs_torch_ce": _max_err(ref_loss, torch_ce),
        }
        for name, p in model.named_parameters():
            errors[f"grad {name}"] = _max_err(p.grad, _tp_shard(ref_grads[name], p))
        n_sharded = sum(getattr(p, "tensor_model_parallel", False) for p in model.parameters())
        return dict(errors=errors, n_sharded=n_sharded, n_params=len(ref_grads))

    return _with_model_parallel(2, 1, sharded)


def case_recompute_replays_dropout(seed):
    """Full recompute with dropout gives the gradients of no recompute (RNG replay on CPU)."""
    dropout = dict(hidden_dropout=0.2, attention_dropout=0.2)
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    batch = _batch(1)

    def run(**overrides):
        model = _gpt(_config(tp=2, **overrides), seed)  # resets the RNG tracker
        loss = _model_loss(model, batch)
        loss.backward()
        return loss.detach(), _snapshot(model)[1]

    def compare():
        plain_loss, plain_grads = run(**dropout)
        loss, grads = run(**dropout, **recompute)
        no_dropout_loss, _ = run()
        errors = {f"grad {n}": _max_err(g, plain_grads[n]) for n, g in grads.items()}
        errors["loss"] = _max_err(loss, plain_loss)
        return dict(errors=errors, dropout_effect=_max_err(plain_loss, no_dropout_loss))

    return _with_model_parallel(2, 1, compare)


def _pp_forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output):  # only called on the last stage
        loss = output.mean()
        # The schedule divides `loss` in place by the number of microbatches:
        # report a clone (MEGATRON_ON_CPU.md trap 3).
        return loss, {"loss": loss.detach().clone()}

    return per_token, loss_func


def case_pipeline_matches_single_stage(seed, num_microbatches, tp):
    """A TPxPP2 1F1B schedule gives the losses and gradients of the whole model on one stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = [_batch(i) for i in range(num_microbatches)]

    def reference():
        model = _gpt(_config(), seed, tied=True)
        losses = []
        for batch in batches:
            loss = _model_loss(model, batch)
            (loss / num_microbatches).backward()
            losses.append(loss.item())
        return losses, *_snapshot(model)

    ref_losses, ref_params, ref_grads = _with_model_parallel(1, 1, reference)

    def global_name(model, name):
        """This stage's parameter name -> the single-stage model's."""
        if name == "output_layer.weight":  # the last stage's copy of the tied embedding
            return "embedding.word_embeddings.weight"
        if name.startswith("decoder.layers."):
            local = int(name.split(".")[2])
            number = model.decoder.layers[local].layer_number  # 1-based, global
            return name.replace(f"decoder.layers.{local}.", f"decoder.layers.{number - 1}.", 1)
        return name

    def pipelined():
        model = _gpt(_config(tp=tp, pp=2), seed + 1, tied=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(_tp_shard(ref_params[global_name(model, name)], p))
        out = get_forward_backward_func()(
            forward_step_func=_pp_forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        errors = {}
        for name, p in model.named_parameters():
            grad = p.grad
            if "word_embeddings" in name or name == "output_layer.weight":
                # The tied embedding's gradient is the sum of both stages' copies.
                grad = grad.clone()
                dist.all_reduce(grad, group=ps.get_pipeline_model_parallel_group())
            expected = _tp_shard(ref_grads[global_name(model, name)], p)
            errors[f"grad {global_name(model, name)}"] = _max_err(grad, expected)
        losses = [d["loss"].item() for d in out]
        return dict(errors=errors, losses=losses, last_stage=ps.is_pipeline_last_stage())

    return ref_losses, _with_model_parallel(tp, 2, pipelined)


def case_ddp_optimizer_step(seed, use_distributed_optimizer):
    """Megatron DDP + optimizer (plain or distributed) at DP2 take the step torch's AdamW takes."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    # A first Adam step moves each weight by lr * g / (|g| + eps): a large eps keeps
    # that Lipschitz in g, so reduction-order noise in g stays small in the weights.
    adam = dict(lr=1e-2, eps=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    clip = 0.05  # below the gradient norm, so clipping takes part
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [_batch(10 + r) for r in range(world)]

    def run():
        config = _config()
        reference = _gpt(config, seed)
        loss = sum(_model_loss(reference, b) for b in batches) / world  # the DP-averaged loss
        loss.backward()
        ref_params = {n: p.detach().clone() for n, p in reference.named_parameters()}
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        torch.optim.AdamW(reference.parameters(), **adam).step()
        expected = {n: p.detach() for n, p in reference.named_parameters()}

        model = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer,
            ),
            module=_gpt(config, seed + 1),
        )
        with torch.no_grad():  # params are views into DDP's buffer: copy in place
            for name, p in model.module.named_parameters():
                p.copy_(ref_params[name])
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=adam["lr"], adam_eps=adam["eps"], adam_beta1=adam["betas"][0],
                adam_beta2=adam["betas"][1], weight_decay=adam["weight_decay"], clip_grad=clip,
                use_distributed_optimizer=use_distributed_optimizer,
            ),
            [model],
        )
        model.zero_grad_buffer()
        optimizer.zero_grad()
        _model_loss(model, batches[rank]).backward()
        model.finish_grad_sync()
        ok, grad_norm, _ = optimizer.step()
        errors = {"grad_norm": abs(grad_norm - norm.item())}
        for name, p in model.module.named_parameters():
            errors[f"param {name}"] = _max_err(p.detach(), expected[name])
        return dict(errors=errors, ok=ok, clipped=norm.item() > clip)

    return _with_model_parallel(1, 1, run)


class _DigitTokenizer:
    """Text is space-separated token ids; the highest id ends a sequence."""

    eod, bos = VOCAB - 1, None

    def tokenize(self, text):
        return [int(t) for t in text.split()]

    def detokenize(self, ids, **kwargs):
        return " ".join(str(int(i)) for i in ids)


def _static_engine(model):
    """Megatron's legacy static inference engine around `model` (0.16 and 0.19 APIs)."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.engines import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
        GPTInferenceWrapper,
    )
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    context = StaticInferenceContext(max_batch_size=1, max_sequence_length=SEQ)
    try:  # 0.16 wraps with an InferenceWrapperConfig; 0.19 reads the model config
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
            InferenceWrapperConfig,
        )
    except ImportError:
        wrapped = GPTInferenceWrapper(model, context)
    else:
        config = InferenceWrapperConfig(
            hidden_size=HIDDEN, inference_batch_times_seqlen_threshold=-1,
            fp32_residual_connection=False, params_dtype=torch.float32, padded_vocab_size=VOCAB,
        )
        wrapped = GPTInferenceWrapper(model, config, context)
    controller = TextGenerationController(inference_wrapped_model=wrapped, tokenizer=_DigitTokenizer())
    return StaticInferenceEngine(text_generation_controller=controller, max_batch_size=1, legacy=True)


def case_static_inference_greedy(seed, prompt, num_tokens):
    """TP2 greedy generation (static engine, `.cuda()` inside) equals a hand-written greedy loop."""
    from megatron.core import parallel_state as ps
    from megatron.core.inference import utils as inference_utils
    from megatron.core.inference.sampling_params import SamplingParams

    def run():
        model = _gpt(_config(tp=2), seed).eval()
        try:
            engine = _static_engine(model)
            request = engine.generate(
                prompts=[" ".join(map(str, prompt))],
                sampling_params=SamplingParams(num_tokens_to_generate=num_tokens, top_k=1),
            )[0]
        finally:  # 0.19 leaves InferenceMode on after generate() (MEGATRON_ON_CPU.md trap 5)
            if hasattr(inference_utils, "InferenceMode"):
                inference_utils.InferenceMode.unset_active()
        tokens = list(prompt)
        with torch.no_grad():
            for _ in range(num_tokens):
                local = model(torch.tensor([tokens]), torch.arange(len(tokens))[None], None)  # [1, s, V/tp]
                pieces = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
                dist.all_gather(pieces, local.contiguous(), group=ps.get_tensor_model_parallel_group())
                tokens.append(int(torch.cat(pieces, dim=-1)[0, -1].argmax()))
        return [int(t) for t in request.generated_tokens], tokens[len(prompt):]

    return _with_model_parallel(2, 1, run)


# --- tests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pools(gloo_pools):
    """Gloo pools by world size; their ranks run with the CPU redirections active."""
    if torch.cuda.is_available():
        pytest.skip("cpu_compat stays off when CUDA is present")
    return gloo_pools


@pytest.fixture(scope="module")
def pool2(pools):
    return pools(2)


def _assert_small(errors, tol=TOL):
    bad = {k: v for k, v in errors.items() if not v <= tol}  # `not <=` also catches NaN
    assert not bad, f"{len(bad)} of {len(errors)} above {tol}: {bad}"


def _enable_in_subprocess(fake_cuda: bool) -> list[str]:
    """`enable()`, `is_active()` and whether torch.cuda.current_device is untouched, in a fresh process."""
    code = (
        "import torch\n"
        + ("torch.cuda.is_available = lambda: True\n" if fake_cuda else "")
        + "current_device = torch.cuda.current_device\n"
        "from vopd_megatron.megatron import cpu_compat\n"
        "print(cpu_compat.enable(), cpu_compat.is_active(), torch.cuda.current_device is current_device)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_enable_is_noop_with_cuda():
    """With CUDA reported present, `enable()` returns False and leaves torch.cuda alone."""
    assert _enable_in_subprocess(fake_cuda=True) == ["False", "False", "True"]


@pytest.mark.gpu
def test_enable_is_noop_on_a_real_gpu():
    assert _enable_in_subprocess(fake_cuda=False) == ["False", "False", "True"]


def test_enable_is_active_and_idempotent(pool2):
    for result in pool2.run(case_enable_is_idempotent):
        assert result == dict(active=True, again=True, not_rewrapped=True, current_device="cpu")


def test_cuda_standins(pool2):
    results = pool2.run(case_cuda_standins)
    for result in results:
        assert result["device"] == "cpu"
        assert result["event_ms"] >= 20.0 and result["timer_s"] >= 0.02, result
    assert "step" in results[-1]["summary"]  # the last rank writes the summary


def test_torch_compile_still_traces(pool2):
    assert pool2.run(case_torch_compile) == [True, True]


def test_broadcast_data(pool2):
    assert pool2.run(case_broadcast_data) == [True, True]


def test_rng_tracker_streams(pool2):
    r0, r1 = pool2.run(case_rng_tracker, 1234)
    assert torch.equal(r0["default"], r1["default"]), "default stream must agree across TP ranks"
    assert not torch.equal(r0["tp_draw"], r1["tp_draw"]), "TP stream must differ across TP ranks"
    assert r0["fork_restores"] and r1["fork_restores"], "fork() must restore the default stream"


def test_tp2_matches_tp1(pool2):
    for result in pool2.run(case_tp2_matches_tp1, 7):
        assert result["n_sharded"] >= 8  # qkv, proj, fc1, fc2 per layer, embedding, output layer
        assert sum(k.startswith("grad ") for k in result["errors"]) == result["n_params"]
        _assert_small(result["errors"])


def test_recompute_replays_dropout(pool2):
    for result in pool2.run(case_recompute_replays_dropout, 11):
        assert result["dropout_effect"] > 1e-3, "dropout must change the loss for this test to mean anything"
        _assert_small(result["errors"])


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "tp2xpp2"])
def test_pipeline_1f1b_matches_single_stage(pools, tp):
    num_microbatches = 4
    results = pools(2 * tp).run(case_pipeline_matches_single_stage, 5, num_microbatches, tp)
    ref_losses = results[0][0]
    for _, result in results:
        _assert_small(result["errors"])
        if result["last_stage"]:
            assert result["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert sum(r["last_stage"] for _, r in results) == tp  # one last stage per TP rank


def test_static_inference_greedy(pool2):
    for engine_tokens, loop_tokens in pool2.run(case_static_inference_greedy, 3, [5, 17, 33, 2, 90], 6):
        assert engine_tokens == loop_tokens
        assert len(loop_tokens) == 6 and _DigitTokenizer.eod not in loop_tokens


@pytest.mark.parametrize("use_distributed_optimizer", [False, True], ids=["plain", "distopt"])
def test_ddp_optimizer_step(pool2, use_distributed_optimizer):
    for result in pool2.run(case_ddp_optimizer_step, 3, use_distributed_optimizer):
        assert result["ok"] and result["clipped"]
        _assert_small(result["errors"])
