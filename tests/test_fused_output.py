"""The fused output-layer loss (--vopd-fused-output) == reference, values and gradients wrt h_s and W_s.

Every rank builds the same global hidden states and output weights of both
models from a seed, pads the vocabulary the way Megatron pads the output
layer (padded student rows hold garbage, padded teacher rows NaN: neither may
be read), keeps its own `[V/tp, H]` weight rows, and runs the fused loss with
small tiles (10 vocabulary tiles at TP 1, ragged row chunks). The parent
compares with the float64 reference on the logits `h @ W^T` of the same
(dtype-rounded) values, gradients by autograd through that product, with
test_vocab_parallel's tolerance table. In fp32 each rank also runs the logits
path (vocab_parallel_opd_loss on `h @ W^T`, autograd through the GEMM) and
the two must agree to the same table.

The Triton kernels run in spawned ranks with TRITON_INTERPRET=1 (as in
test_triton_kernels) on a few small shapes; the Megatron side (tied output
weights, TP and PP) is compared with the logits path in the same processes.
"""
import math

import pytest
import torch
import torch.distributed as dist

from tests.test_vocab_parallel import TOLERANCE, bit_equal, normalised_error, padded_vocab, tp_group
from vopd_megatron.loss import LOSS_MODES, LossConfig, reference_loss, summarize_metrics, vocab_parallel_opd_loss
from vopd_megatron.loss import fused_steps
from vopd_megatron.loss import stats as S
from vopd_megatron.loss.fused_output import fused_output_opd_loss
from vopd_megatron.testing import GlooPool

WORLD = 4
H_S, H_EXTRA = 48, 32  # the teacher's hidden states are [h_s, extra]: H_t = 80
SMALL_TILES = {"tile_width": 128, "tile_elements": 128 * 7}  # 7-row chunks of 18 tokens


def make_hidden_inputs(seed, shape, vocab, vocab_padded, scale=3.0, distance=1.0):
    """Global float64 (h_s, W_s, h_t, W_t) with padded weight rows, targets, mask.

    The teacher's logits are the student's plus an independent part of size
    `distance`: h_t = [h_s, x], W_t = [W_s, Y]. Student logits have std `scale`.
    """
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    hs = torch.randn(n, H_S, generator=g, dtype=torch.float64)
    ws = torch.randn(vocab_padded, H_S, generator=g, dtype=torch.float64) * (scale / H_S**0.5)
    ht = torch.cat([hs, torch.randn(n, H_EXTRA, generator=g, dtype=torch.float64)], 1)
    wt = torch.cat([ws, torch.randn(vocab_padded, H_EXTRA, generator=g, dtype=torch.float64)
                    * (distance / H_EXTRA**0.5)], 1)
    ws[vocab:], wt[vocab:] = 50.0, float("nan")  # padding rows must never be read
    z = hs @ ws[:vocab].t()
    targets = torch.multinomial(torch.softmax(z, -1), 1, generator=g).view(shape)
    mask = (torch.rand(shape, generator=g) > 0.2).double()
    mask.view(-1, shape[-1])[1] = 0  # one whole row of tokens masked
    return hs.view(*shape, H_S), ws, ht.view(*shape, H_S + H_EXTRA), wt, targets, mask


def run_fused(tp, dtype, config, inputs, vocab, tiles, extra=None, with_logits_path=False):
    """One rank: the fused loss on its weight rows; values, gradients, checks."""
    group = tp_group(tp)
    rank = dist.get_rank(group)
    hs_full, ws_full, ht_full, wt_full, targets, mask = inputs
    part = ws_full.shape[0] // tp
    rows = slice(rank * part, (rank + 1) * part)
    hs = hs_full.to(dtype).requires_grad_()
    ws = ws_full[rows].to(dtype).requires_grad_()
    ht, wt = ht_full.to(dtype), wt_full[rows].to(dtype)
    before = [t.detach().clone() for t in (hs, ws, ht, wt)]
    inputs_ptrs = {t.data_ptr() for t in (hs, ws, ht, wt)}
    other_saved = []

    def pack(t):  # saved tensors other than references to the inputs
        if t.data_ptr() not in inputs_ptrs:
            other_saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, num_tokens, metrics = fused_output_opd_loss(
            hs, ws, ht, wt, targets, mask, config, vocab_size=vocab, group=group, **tiles, **(extra or {}))
    loss_sum.backward()
    out = {
        "loss_sum": loss_sum.detach().double(), "num_tokens": int(num_tokens), "metrics": summarize_metrics(metrics),
        "grad_h": hs.grad.double(), "grad_w": ws.grad.double(), "other_saved_bytes": sum(other_saved),
        "inputs_unchanged": all(bit_equal(a, b.detach()) for a, b in zip(before, (hs, ws, ht, wt))),
    }
    if with_logits_path:  # the logits path on the same values: output layer GEMM + vocab_parallel loss
        hs2, ws2 = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
        z, u = hs2 @ ws2.t(), ht @ wt.t()  # [*shape, V/tp]
        loss2, _, _ = vocab_parallel_opd_loss(z, u, targets, mask, config, vocab_size=vocab, group=group,
                                              **(extra or {}))
        loss2.backward()
        hs_grad = hs2.grad.clone()
        dist.all_reduce(hs_grad, group=group)  # what Megatron's TP copy does in backward
        out["logits_path"] = (loss2.detach().double(), hs_grad.double(), ws2.grad.double())
    return out


def reference(config, inputs, vocab, dtype, extra=None):
    """Float64 reference on `h @ W^T` of the dtype-rounded inputs; grads wrt h_s and W_s."""
    hs, ws, ht, wt, targets, mask = (t.to(dtype).double() if t.is_floating_point() and i < 4 else t
                                     for i, t in enumerate(inputs))
    hs, ws = hs.clone().requires_grad_(), ws[:vocab].clone().requires_grad_()
    z, u = hs @ ws.t(), ht @ wt[:vocab].t()
    loss_sum, num_tokens, metrics = reference_loss(z, u, targets, mask, config, **(extra or {}))
    loss_sum.backward()
    return loss_sum.detach(), int(num_tokens), summarize_metrics(metrics), hs.grad, ws.grad


def check_fused(pool, tp, dtype, config, vocab, shape=(6, 3), seed=0, divisible=128, tiles=SMALL_TILES,
                extra_fn=None, tol=None):
    vocab_padded = padded_vocab(vocab, tp, divisible)
    inputs = make_hidden_inputs(seed, shape, vocab, vocab_padded)
    extra = extra_fn(inputs, dtype) if extra_fn else None
    with_logits = dtype == torch.float32
    results = pool.run(run_fused, tp, dtype, config, inputs, vocab, tiles, extra, with_logits)
    ref_loss, ref_tokens, ref_metrics, ref_gh, ref_gw = reference(config, inputs, vocab, dtype, extra)
    tol = tol or TOLERANCE[dtype]
    k = config.top_k if config.needs_topk else 0
    for start in range(0, len(results), tp):
        group = results[start : start + tp]
        grad_w = torch.cat([r["grad_w"] for r in group], 0)  # [Vp, H_s]
        assert torch.all(grad_w[vocab:] == 0), "padded vocabulary rows received gradient"
        errs = {"grad_w": normalised_error(grad_w[:vocab], ref_gw)}
        for r in group:
            errs["grad_h"] = max(errs.get("grad_h", 0.0), normalised_error(r["grad_h"], ref_gh))
            val_err = abs(float(r["loss_sum"] - ref_loss)) / max(abs(float(ref_loss)), 1.0)
            assert val_err <= tol["value"], f"loss error {val_err:.2e}"
            assert r["num_tokens"] == ref_tokens
            for key in ("kl", "log_ratio", "advantage", "student_logprob"):
                assert r["metrics"][key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-4), key
            assert r["inputs_unchanged"], "inputs were modified"
            budget = math.prod(shape) * (96 + 24 * k)  # O(N): nothing [N, V_tile]-sized is saved
            assert r["other_saved_bytes"] <= budget, f"saved {r['other_saved_bytes']} B beyond the inputs"
        for name, err in errs.items():
            assert err <= tol["grad"], f"{name} error {err:.2e} > {tol['grad']:.0e}"
        if with_logits:  # the logits path agrees with the fused one directly
            lp_w = torch.cat([r["logits_path"][2] for r in group], 0)
            assert normalised_error(grad_w, lp_w) <= tol["grad"]
            for r in group:
                lp_loss, lp_h, _ = r["logits_path"]
                assert abs(float(r["loss_sum"] - lp_loss)) / max(abs(float(lp_loss)), 1.0) <= tol["value"]
                assert normalised_error(r["grad_h"], lp_h) <= tol["grad"]
    return results


@pytest.fixture(scope="module")
def pool(gloo_pools):
    return gloo_pools(WORLD)


def mode_config(mode, **kw):
    return LossConfig(mode=mode, top_k=kw.pop("top_k", 3), opt_baseline_eps=1e-4, **kw)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_matches_reference_on_padded_odd_vocab(pool, tp, dtype, mode):
    check_fused(pool, tp, dtype, mode_config(mode, temperature=0.7), vocab=1271, seed=tp)


@pytest.mark.parametrize("top_k", [500, 5000])  # > the tp4 shard (320), > vocab
@pytest.mark.parametrize("mode", ["vopd_topk", "topk_kl"])
def test_streaming_topk_larger_than_tile_shard_and_vocab(pool, top_k, mode):
    check_fused(pool, 4, torch.float32, mode_config(mode, top_k=top_k, temperature=1.3), vocab=1271, seed=20)


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_shard_made_only_of_padding(pool, mode):
    # vocab 130 padded to 256 at tp4 (divisible 64): rank 3 owns no real column.
    check_fused(pool, 4, torch.float32, mode_config(mode), vocab=130, divisible=64, seed=30)


def _correction_inputs(inputs, dtype, vocab=1271):
    """Behaviour and old log-probs near the student's own log p(a)."""
    hs, ws, _, _, targets, _ = inputs
    logp = (hs.to(dtype).double() @ ws.to(dtype).double()[:vocab].t()).log_softmax(-1)
    logp = logp.gather(-1, targets[..., None]).squeeze(-1)
    g = torch.Generator().manual_seed(5)
    return {"behavior_logprobs": logp + torch.randn(logp.shape, generator=g, dtype=torch.float64),
            "old_logprobs": logp + 0.5 * torch.randn(logp.shape, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("mode,correction", [("vopd", "truncate"), ("vopd_opt", "mask"), ("full_kl", "mask")])
def test_rollout_correction_and_ppo(pool, mode, correction):
    kw = {"ppo_clip": 0.2} if mode != "full_kl" else {}
    cfg = mode_config(mode, rollout_correction=correction, rollout_correction_cap=1.5, **kw)

    def extra(inputs, dtype):
        out = _correction_inputs(inputs, dtype)
        return out if kw else {"behavior_logprobs": out["behavior_logprobs"]}

    check_fused(pool, 2, torch.float32, cfg, vocab=1271, seed=40, extra_fn=extra)


def test_default_tiles_single_tile(pool):
    # The default plan: one tile holds the whole shard and every row.
    check_fused(pool, 2, torch.float32, mode_config("vopd_opt", temperature=0.7), vocab=1271, seed=3, tiles={})


# --- math steps, no processes -------------------------------------------------------------


@pytest.mark.parametrize("need_opt,k", [(False, 0), (True, 4)])
def test_folding_tiles_equals_one_pass(need_opt, k):
    # Statistics of column tiles folded one by one == one pass over all columns,
    # with running maxima that jump by 1e4 between tiles.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 300, generator=g, dtype=torch.float64) * 3
    u = z + torch.randn(5, 300, generator=g, dtype=torch.float64)
    z[0, 250], u[1, 40], z[2, 7] = 1e4, 1e4, -1e4
    target = torch.tensor([250, 3, 299, 100, 0])
    owned = torch.tensor([True, True, True, False, True])
    rows = S.stat_rows(need_opt, k)
    one = torch.empty(rows, 5, dtype=torch.float64)
    S.local_statistics(z, u, target, owned, need_opt, k, one)
    acc = fused_steps.empty_statistics(rows, 5, k, torch.float64, "cpu")
    for c0 in range(0, 300, 64):
        w = min(64, 300 - c0)
        tile = torch.empty(rows, 5, dtype=torch.float64)
        lt = target - c0
        fused_steps.tile_statistics(z[:, c0 : c0 + w], u[:, c0 : c0 + w], lt, owned & (lt >= 0) & (lt < w),
                                    need_opt, k, tile)
        fused_steps.fold_statistics(acc, tile, need_opt)
        if k:
            fused_steps.fold_topk(acc[-2 * k :], tile[-2 * k :], k)
    # Both are relative to the shard maxima: the rows must agree as numbers.
    assert torch.allclose(acc, one, rtol=1e-12, atol=1e-12)


# --- peak memory on CPU -----------------------------------------------------------------------


def test_peak_memory_is_one_tile_not_the_logits():
    from vopd_megatron.testing.memory import cpu_peak_bytes

    n, vocab, h = 256, 16384, 32
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(n, h, generator=g).requires_grad_()
    ws = (torch.randn(vocab, h, generator=g) * 0.5).requires_grad_()
    ht, wt = torch.randn(n, h, generator=g), torch.randn(vocab, h, generator=g) * 0.5
    targets, mask = torch.randint(0, vocab, (n,), generator=g), torch.ones(n)
    cfg = LossConfig(mode="vopd")
    tile_width = 1024

    def fused():
        loss, count, _ = fused_output_opd_loss(hs, ws, ht, wt, targets, mask, cfg, tile_width=tile_width)
        torch.autograd.grad(loss / count, (hs, ws))

    def logits_path():
        z = hs @ ws.t()  # [n, V]
        with torch.no_grad():
            u = ht @ wt.t()
        loss, count, _ = vocab_parallel_opd_loss(z, u, targets, mask, cfg)
        del u
        torch.autograd.grad(loss / count, (hs, ws))

    grads = 4 * (n * h + vocab * h)  # dh and dW, which both paths return
    tile = 4 * n * tile_width  # one fp32 [n, w] tile
    fused_peak, logits_peak = cpu_peak_bytes(fused), cpu_peak_bytes(logits_path)
    assert fused_peak <= grads + 8 * tile + (1 << 20), (fused_peak, grads, tile)
    assert logits_peak >= 2 * 4 * n * vocab  # both [n, V] logits at once: the test can tell the two apart
    assert fused_peak - grads <= (logits_peak - grads) / 4, (fused_peak, logits_peak)


# --- Triton kernels, in the interpreter --------------------------------------------------------


@pytest.fixture(scope="module")
def interp_pool():
    p = GlooPool(2, env={"TRITON_INTERPRET": "1"})
    yield p
    p.close()


def kernel_kinds():
    from vopd_megatron.loss import fused_output_triton as TF
    from vopd_megatron.loss import triton_kernels as TK

    return tuple(type(k).__name__ for k in (TF._fused_stats_kernel, TF._fused_grad_kernel, TK._stats_kernel))


@pytest.mark.parametrize("gemm", ["torch", "triton"])
@pytest.mark.parametrize("tp,dtype,mode", [
    (2, torch.float32, "vopd"), (2, torch.float32, "vopd_opt"), (2, torch.float32, "full_kl"),
    (2, torch.float32, "topk_kl"), (2, torch.bfloat16, "vopd"), (1, torch.float32, "vopd_topk"),
], ids=lambda x: str(x).replace("torch.", ""))
def test_triton_interpreter_matches_reference(interp_pool, tp, dtype, mode, gemm):
    # vocab 300 padded to 384 at tp 2 (shards of 192 and 108 real columns), 320 at tp 1.
    # gemm "torch": torch GEMM tiles of 96 columns in 7-row chunks, each folded by the
    # logits path's statistics kernel (fold=True) and differentiated by its gradient
    # kernels (fp32 tiles in, the weights' dtype out). gemm "triton": kernel blocks
    # 16 x 64 x 32, two row blocks (18 tokens), ragged column and K blocks (H_s = 48,
    # H_t = 80); backward tiles as above.
    cfg = mode_config(mode, temperature=0.7, backend="triton")
    check_fused(interp_pool, tp, dtype, cfg, vocab=300, divisible=64, seed=7,
                tiles={"tile_width": 96, "tile_elements": 96 * 7, "gemm": gemm})
    assert interp_pool.run(kernel_kinds) == [("InterpretedFunction",) * 3] * 2


def kernel_launches(gemm, mode="vopd"):
    """One rank under the interpreter: which launch wrappers a fused loss of `mode`
    calls (forward and backward), with 3 vocabulary tiles of 2 row chunks."""
    from vopd_megatron.loss import fused_output_triton as TF
    from vopd_megatron.loss import triton_kernels as TK

    calls, real = [], {}

    def counting(module, name):
        real[module, name] = fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append((name, kwargs.get("fold", False)))
            return fn(*args, **kwargs)

        setattr(module, name, wrapper)

    for module, names in ((TK, ("shard_statistics", "sampled_gradient")), (TF, ("fused_statistics",
                                                                                   "sampled_grad_tile"))):
        for name in names:
            counting(module, name)
    try:
        g = torch.Generator().manual_seed(0)
        hs, ws = torch.randn(8, 16, generator=g).requires_grad_(), torch.randn(96, 16, generator=g).requires_grad_()
        loss, _, _ = fused_output_opd_loss(hs, ws, hs.detach(), ws.detach() * 0.5, torch.arange(8), torch.ones(8),
                                           LossConfig(mode=mode, top_k=4, backend="triton"), tile_width=32,
                                           tile_elements=32 * 4, gemm=gemm)
        loss.backward()
    finally:
        for (module, name), fn in real.items():
            setattr(module, name, fn)
    return calls


def test_tile_gemm_choice_reaches_the_kernels(interp_pool):
    # gemm "torch" (the default): per tile chunk one folding statistics launch and one
    # gradient launch of the logits path's kernels; gemm "triton": the tl.dot kernels.
    # The top-k modes fold with the same kernel whatever gemm says (torch.topk needs the tiles).
    tiles = 3 * 2
    hybrid, dot = interp_pool.run(kernel_launches, "torch")[0], interp_pool.run(kernel_launches, "triton")[0]
    assert hybrid == [("shard_statistics", True)] * tiles + [("sampled_gradient", False)] * tiles, hybrid
    assert dot == [("fused_statistics", False)] + [("sampled_grad_tile", False)] * tiles, dot
    topk = interp_pool.run(kernel_launches, "triton", "vopd_topk")[0]
    assert topk == [("shard_statistics", True)] * tiles + [("sampled_grad_tile", False)] * tiles, topk


@pytest.mark.parametrize("path", ["fused", "fused:triton"])
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_triton_interpreter_extreme_logits_and_non_finite_masked_row(interp_pool, mode, path):
    # test_loss_faults' cases through the fused kernels (both tile GEMMs): the issue's
    # logits of 2e4 (gradient within 1e-4 of float64) and a NaN hidden state on a masked token.
    from tests.test_loss_faults import backend_case

    for result in interp_pool.run(backend_case, mode, "triton", "cpu", path):
        assert result["grad_error"] < 1e-4 and result["masked_row_changes_nothing"], result


def test_tile_gemm_choice_is_read_and_checked(monkeypatch):
    # VOPD_FUSED_GEMM picks the Triton backend's tile GEMMs ("torch" when unset or
    # empty); an unknown value is refused naming the variable, and the pre-flight
    # check turns that into vopd-train's one-line ConfigError.
    from vopd_megatron.config import ConfigError, RunConfig
    from vopd_megatron.loss.backend import fused_gemm
    from vopd_megatron.model.runtime_checks import check_runtime

    monkeypatch.delenv("VOPD_FUSED_GEMM", raising=False)
    assert fused_gemm() == "torch" and fused_gemm("Triton ") == "triton"
    monkeypatch.setenv("VOPD_FUSED_GEMM", "")
    assert fused_gemm() == "torch"
    monkeypatch.setenv("VOPD_FUSED_GEMM", "triton")
    assert fused_gemm() == "triton" and fused_gemm("torch") == "torch"  # an explicit choice wins
    with pytest.raises(ValueError, match="fused output GEMM 'cublas'"):
        fused_gemm("cublas")
    monkeypatch.setenv("VOPD_FUSED_GEMM", "cublas")
    with pytest.raises(ConfigError, match="VOPD_FUSED_GEMM='cublas': expected one of torch, triton"):
        check_runtime(RunConfig())
    h, w = torch.zeros(4, 8), torch.zeros(16, 8)
    with pytest.raises(ValueError, match="VOPD_FUSED_GEMM"):
        fused_output_opd_loss(h, w, h, w, torch.zeros(4, dtype=torch.long), torch.ones(4), LossConfig())


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, w = torch.zeros(4, 8), torch.zeros(16, 8)
    t, m = torch.zeros(4, dtype=torch.long), torch.ones(4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fused_output_opd_loss(h, w, h, w, t, m, LossConfig(backend="triton"))
    with pytest.raises(ValueError, match="output weight"):
        fused_output_opd_loss(h, w[:, :4], h, w, t, m, LossConfig())
    with pytest.raises(ValueError, match="vocabulary rows"):
        fused_output_opd_loss(h, w, h, w[:8], t, m, LossConfig())


def test_fused_kernels_compile_to_sm90_cubin():
    # As test_triton_kernels: lowering errors (tl.dot shapes, input precision) show only when compiled.
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vopd_megatron.loss import fused_output_triton as TF

    if type(TF._fused_stats_kernel).__name__ != "JITFunction":
        pytest.skip("kernels were defined under TRITON_INTERPRET")

    def sig(fn, dtype, **ptrs):
        ptrs.update(dict.fromkeys(("hs_ptr", "ws_ptr", "ht_ptr", "wt_ptr"), f"*{dtype}"), tau="fp32")
        return {n: ptrs.get(n) or ("constexpr" if n.isupper() else "i32") for n in fn.arg_names}

    bn, bv, bk = TF.GPU_BLOCKS
    blocks = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, "TEMPERED": True, "IEEE_S": False, "IEEE_T": False,
              "WIDEN": False}
    stats = sig(TF._fused_stats_kernel, "bf16", tgt_ptr="*i64", out_ptr="*fp32")
    grad = sig(TF._fused_grad_kernel, "bf16", g_ptr="*bf16", max_z_ptr="*fp32", lse_z_ptr="*fp32", max_u_ptr="*fp32",
               lse_u_ptr="*fp32", kl_ptr="*fp32", coef_ptr="*fp32", tgt_ptr="*i64")
    # Two builds (each costs seconds): both logit blocks and the full_kl epilogue are in the second;
    # the sampled epilogue is the logits kernel's, compiled by test_triton_kernels.
    for fn, signature, constexprs in ((TF._fused_stats_kernel, stats, {**blocks, "NEED_OPT": True}),
                                      (TF._fused_grad_kernel, grad, {**blocks, "FULL_KL": True})):
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert len(compiled.asm["cubin"]) > 0, fn.__name__
        ptx = compiled.asm["ptx"]
        assert "div.rn.f32" in ptx, f"{fn.__name__}: tempering is not the IEEE division"
        assert "mma" in ptx, f"{fn.__name__}: the bf16 logit blocks do not run on tensor cores"


def test_tile_epilogue_kernels_compile_to_sm90_cubin():
    # gemm "torch" launches the logits path's kernels on fp32 tiles: the statistics kernel
    # folding into running rows, the gradient kernels writing bf16 from fp32 tiles.
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.test_triton_kernels import kernel_signatures
    from vopd_megatron.loss import triton_kernels as TK

    if type(TK._stats_kernel).__name__ != "JITFunction":
        pytest.skip("kernels were defined under TRITON_INTERPRET")
    for fn, signature, constexprs, warps in kernel_signatures("fp32"):
        if fn is TK._stats_kernel:
            constexprs = {**constexprs, "FOLD": True}
        else:  # the gradient tile in the weights' dtype
            signature = {**signature, **{k: "*bf16" for k in ("dz_ptr", "g_ptr") if k in signature}}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert len(compiled.asm["cubin"]) > 0, fn.__name__
        assert "div.rn.f32" in compiled.asm["ptx"], f"{fn.__name__}: tempering is not the IEEE division"


# --- Megatron: the distillation stage with --vopd-fused-output ------------------------------------


def tied_step_case(tp, pp, mode, bf16=False):
    """Tied output weights (the output layer IS the word embedding; at PP 2 the last
    stage's copy, whose gradient finalize_model_grads all-reduces with the first
    stage's): one schedule step on the logits path, one with the fused output,
    the finalized student gradients of both. Returns (max diff / scale, scale,
    the output weight's own gradient norm on the last stage)."""
    from megatron.core import parallel_state

    from tests.test_train_step import GLOBAL_BATCH, SEQ, VOCAB, _setup, _teardown, _unwrap, my_microbatches
    from vopd_megatron.config import ModelArgs, ParallelArgs, RunConfig, TrainArgs
    from vopd_megatron.megatron.fused_output import OutputLayerInput
    from vopd_megatron.model.masks import causal_mask
    from vopd_megatron.training.step import forward_backward, wire_megatron_hooks

    student = ModelArgs(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB, seq_length=SEQ)
    teacher = ModelArgs(num_layers=2, hidden_size=96, num_attention_heads=4, vocab_size=VOCAB, seq_length=SEQ)
    train = TrainArgs(micro_batch_size=1, global_batch_size=GLOBAL_BATCH, bf16=bf16)
    run = RunConfig(model=student, teacher=teacher, train=train,
                    parallel=ParallelArgs(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    models = _setup(run)
    try:
        wire_megatron_hooks(models)
        microbatches = my_microbatches(run, dist.get_world_size())
        config = LossConfig(mode=mode, top_k=5, temperature=0.8)
        forward_backward(models, microbatches, run, config)
        student_model = _unwrap(models.student[0])
        logits_path = {n: p.main_grad.detach().clone() for n, p in student_model.named_parameters()}
        models.stages[0].fused_output = True
        forward_backward(models, microbatches, run, config)
        scale = torch.tensor(max(float(g.abs().max()) for g in logits_path.values()))
        dist.all_reduce(scale, op=dist.ReduceOp.MAX)
        diff = max(float((p.main_grad - logits_path[n]).abs().max()) for n, p in student_model.named_parameters())
        out_grad = 0.0
        if parallel_state.is_pipeline_last_stage():
            weight = student_model.shared_embedding_or_output_weight()
            out_grad = float(weight.main_grad.norm())
            # The stage hands over the Parameter itself (no fp32 copy by Float16Module under bf16).
            mb = microbatches[0]
            with torch.no_grad():
                student_out, _ = models.stages[0](mb["tokens"], mb["position_ids"], causal_mask(SEQ, "cpu"))
            assert isinstance(student_out, OutputLayerInput) and student_out.weight is weight
        return diff / float(scale), sorted(logits_path), out_grad
    finally:
        _teardown()


@pytest.mark.parametrize("tp,pp,mode,bf16", [(2, 1, "vopd", False), (1, 2, "full_kl", False), (2, 1, "vopd", True)])
def test_stage_with_tied_output_weights(gloo_pools, tp, pp, mode, bf16):
    results = gloo_pools(2).run(tied_step_case, tp, pp, mode, bf16)
    for rank, (err, names, out_grad) in enumerate(results):
        assert not any("output_layer" in n for n in names) or pp > 1, "the model is not tied"
        # bf16: the logits path rounds the logits to bf16, the fused one does not; both
        # write bf16 gradients (the table's bf16 gradient tolerance).
        tol = TOLERANCE[torch.bfloat16 if bf16 else torch.float32]["grad"]
        assert err < tol, f"rank {rank}: fused output differs from the logits path by {err:.2e}"
    assert results[-1][2] > 0, "the output weight got no gradient (the comparison would be vacuous)"


def test_adapter_names_token_rows_in_batch_order():
    # The adapter hands the loss its tokens in the hidden states' [s, b] order; a
    # fault must still name token rows of the [b, s] labels (i * s + t), which
    # training.faults.naming_rows maps to data rows. Sequence 0, position 2 is
    # row 2 (not [s, b]'s row 4, which would name the second data row).
    from vopd_megatron.errors import TrainingFault
    from vopd_megatron.loss.per_token import NonFiniteLogitsError
    from vopd_megatron.megatron.fused_output import OutputLayerInput
    from vopd_megatron.megatron.loss_adapter import make_fused_loss_func
    from vopd_megatron.training.faults import naming_rows

    b, s, h, v = 2, 3, 8, 16
    g = torch.Generator().manual_seed(0)
    hs, ht, w = torch.randn(s, b, h, generator=g), torch.randn(s, b, h, generator=g), torch.randn(v, h, generator=g)
    hs[2, 0] = float("nan")
    loss_func = make_fused_loss_func(teacher=OutputLayerInput(ht, w), labels=torch.randint(0, v, (b, s), generator=g),
                                     loss_mask=torch.ones(b, s), config=LossConfig(), vocab_size=v)
    with pytest.raises(NonFiniteLogitsError, match=r"non-finite student logits .*token rows \[2\]") as info:
        loss_func(OutputLayerInput(hs, w))
    assert info.value.token_rows == [2]
    with pytest.raises(TrainingFault, match=r"data row\(s\) a\.jsonl:1$"):
        naming_rows(loss_func, ["a.jsonl:1", "a.jsonl:2"], s)(OutputLayerInput(hs, w))


# --- compiled on a GPU (skipped without CUDA) --------------------------------------------------

GPU_TOLERANCE = {  # as test_triton_kernels: tl.exp is the hardware approximation there
    torch.float32: {"value": 1e-4, "grad": 1e-4},
    torch.bfloat16: {"value": 1e-4, "grad": 8e-3},
}


#: (loss backend, tile GEMMs) of the GPU cases: the cuBLAS tiles with Triton
#: epilogues (the default), the tl.dot kernels, the PyTorch tiles.
GPU_PATHS = [("triton", "torch"), ("triton", "triton"), ("torch", None)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend,gemm", GPU_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_gpu_fused_output_matches_reference(mode, dtype, backend, gemm):
    # V = 32000 in 4096-column tiles (the last one ragged), one process.
    vocab, shape = 32000, (16, 4)
    inputs = make_hidden_inputs(7, shape, vocab, vocab)
    hs, ws, ht, wt, targets, mask = inputs
    cfg = mode_config(mode, temperature=0.7, top_k=5, backend=backend)
    h, w = hs.to(dtype).cuda().requires_grad_(), ws.to(dtype).cuda().requires_grad_()
    loss, count, _ = fused_output_opd_loss(h, w, ht.to(dtype).cuda(), wt.to(dtype).cuda(), targets.cuda(),
                                           mask.cuda(), cfg, tile_width=4096, gemm=gemm)
    loss.backward()
    ref_loss, ref_tokens, _, ref_gh, ref_gw = reference(cfg, inputs, vocab, dtype)
    tol = GPU_TOLERANCE[dtype]
    assert int(count) == ref_tokens
    assert abs(float(loss.double().cpu() - ref_loss)) / max(abs(float(ref_loss)), 1.0) <= tol["value"]
    assert normalised_error(h.grad.double().cpu(), ref_gh) <= tol["grad"]
    assert normalised_error(w.grad.double().cpu(), ref_gw) <= tol["grad"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend,gemm", GPU_PATHS)
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_gpu_fused_extreme_logits_and_non_finite_masked_row(mode, backend, gemm):
    from tests.test_loss_faults import backend_case

    result = backend_case(mode, backend, "cuda", "fused" + (f":{gemm}" if gemm else ""))
    assert result["grad_error"] < 1e-4 and result["masked_row_changes_nothing"], result
