"""Depth pruning (`vopd-convert prune`): layer specs, a checkpoint saved at TP2 and at PP2, parity with
`transformers` models that have the same layers removed, the bit-for-bit check, HF export, errors.

Tiny random Llamas (test_convert's `make_hf_model`) are converted, loaded in gloo pools at TP2 or PP2
and saved there by `save_checkpoint`, so the pruning tool reads per-TP-rank chunks and per-stage layer
ranges; the pruned checkpoint is loaded at another layout and its logits compared with the HF model
rebuilt without the dropped layers.
"""
import os
import re

import pytest
import torch

from tests.guards import user_error

transformers = pytest.importorskip("transformers")

from tests.test_convert import make_hf_model, megatron_logits, tokens  # noqa: E402
from vopd_megatron.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf  # noqa: E402
from vopd_megatron.convert.cli import main as convert_cli  # noqa: E402
from vopd_megatron.convert.prune import check_pruned, kept_layers, parse_layers, prune_checkpoint  # noqa: E402

LAYERS = 4


def hf_without_layers(model, kept: list[int]):
    """A fresh HF model with only the layers `kept` of `model` (renumbered), same weights otherwise."""
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.num_hidden_layers = len(kept)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    pruned = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                                           attn_implementation=model.config._attn_implementation)
    state = {}
    for name, t in model.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m is None:
            state[name] = t
        elif int(m.group(1)) in kept:
            state[f"model.layers.{kept.index(int(m.group(1)))}.{m.group(2)}"] = t
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    pruned.tie_weights()
    return pruned.eval()


def save_at_layout(ckpt_dir, flags, save_dir, tp, pp):
    """Load a converted checkpoint at TP x PP and save it there with vopd-train's save_checkpoint."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from vopd_megatron.config.schema import ModelArgs, ParallelArgs, TrainArgs
    from vopd_megatron.training.model_flags import flags_to_model_args
    from vopd_megatron.model.builder import build_gpt_stage
    from vopd_megatron.training.checkpoint import load_model_weights, save_checkpoint

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    try:
        m = flags_to_model_args(flags, ModelArgs(seq_length=16))
        model = build_gpt_stage(m, ParallelArgs(tp, pp), TrainArgs(), ps.is_pipeline_first_stage(),
                                ps.is_pipeline_last_stage())
        load_model_weights(ckpt_dir, [model])
        save_checkpoint(save_dir, 3, [model], None, None, {"iteration": 3, "consumed_samples": 0})
    finally:
        ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    hf = make_hf_model("llama", str(root / "hf"), layers=LAYERS)
    flags = convert_hf_to_megatron(str(root / "hf"), str(root / "megatron"))
    return root, hf, flags


def test_layer_specs():
    assert parse_layers("1-29:2", 30) == list(range(1, 30, 2))
    assert parse_layers("3, 0-1,7", 8) == [0, 1, 3, 7]
    assert kept_layers(6, drop="1,4") == [0, 2, 3, 5]
    assert kept_layers(6, keep="4-5,0") == [0, 4, 5]
    for spec, match in (("30", "layer 30 does not exist"), ("5-2", "empty range"), ("a", "cannot read 'a'"),
                        ("0-29", "remove all 30 layers")):
        with pytest.raises(ConversionError, match=match):
            kept_layers(30, drop=spec)
    with pytest.raises(ConversionError, match="keeps all 30 layers"):
        kept_layers(30, keep="0-29")


@pytest.mark.parametrize("save_tp,save_pp,load_tp,load_pp", [(2, 1, 1, 2), (1, 2, 2, 1)],
                         ids=["saved-TP2-loaded-PP2", "saved-PP2-loaded-TP2"])
def test_pruned_matches_transformers_without_those_layers(gloo_pools, tiny, tmp_path, save_tp, save_pp,
                                                          load_tp, load_pp):
    root, hf, flags = tiny
    saved = tmp_path / "saved"
    gloo_pools(2).run(save_at_layout, str(root / "megatron"), flags, str(saved), save_tp, save_pp)
    info = prune_checkpoint(str(saved), str(tmp_path / "pruned"), drop="1-2", model_args=None)
    assert info["kept"] == [0, 3] and info["flags"] == {"num-layers": 2}  # a vopd-train save: depth only
    assert info["checked"] > 0
    pruned_flags = dict(flags, **{"num-layers": 2})
    got = gloo_pools(2).run(megatron_logits, [(str(tmp_path / "pruned"), pruned_flags, tokens())],
                            load_tp, load_pp)[-1][0]
    with torch.no_grad():
        ref = hf_without_layers(hf, [0, 3])(tokens()).logits
        full = hf(tokens()).logits
    err = float((got - ref).abs().max())
    assert err <= 1e-4, f"max |logit diff| {err:.2e}"
    assert float((full - ref).abs().max()) > 100 * max(err, 1e-6)  # dropping the layers changed the model


def test_converted_checkpoint_prunes_to_an_hf_model(tiny, tmp_path, capsys):
    """Through the CLI: a converted checkpoint keeps its HF config (new depth), so megatron-to-hf gives
    exactly the HF model without those layers; the flags YAML is complete."""
    root, hf, _ = tiny
    out = tmp_path / "pruned"
    assert convert_cli(["prune", "--load", str(root / "megatron"), "--out", str(out), "--keep-layers", "1,3"]) == 0
    printed = capsys.readouterr().out
    assert "layers [1, 3] of 4 kept" in printed and "checked" in printed
    from vopd_megatron.config import parse_config

    run, _ = parse_config(["--config", str(out / "model_flags.yaml")])
    assert (run.model.num_layers, run.model.hidden_size, run.model.num_query_groups) == (2, 64, 2)
    convert_megatron_to_hf(str(out), str(tmp_path / "hf"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager")
    expected = hf_without_layers(hf, [1, 3])
    assert back.config.num_hidden_layers == 2
    want = expected.state_dict()
    for name, t in back.state_dict().items():
        assert torch.equal(t, want[name]), name


def test_check_catches_a_wrong_layer(tiny, tmp_path):
    root, _, _ = tiny
    info = prune_checkpoint(str(root / "megatron"), str(tmp_path / "p"), drop="1,2", check=False)
    assert info["checked"] == 0
    source = str(root / "megatron" / "iter_0000000")
    assert check_pruned(source, str(tmp_path / "p" / "iter_0000000"), [0, 3]) > 0
    with pytest.raises(ConversionError, match="pruned layer 1 differs from source layer 2"):
        check_pruned(source, str(tmp_path / "p" / "iter_0000000"), [0, 2])


def test_cli_errors_are_one_line(tiny, tmp_path):
    root, _, _ = tiny
    src = str(root / "megatron")
    out = str(tmp_path / "o")
    message = user_error(convert_cli, ["prune", "--load", src, "--out", out, "--drop-layers", "4"])
    assert "layer 4 does not exist" in message
    message = user_error(convert_cli, ["prune", "--load", str(tmp_path / "none"), "--out", out, "--drop-layers", "1"])
    assert "--load" in message and "does not exist" in message
    message = user_error(convert_cli, ["prune", "--load", src, "--out", src, "--drop-layers", "1"])
    assert "--out" in message and src in message
    assert not os.path.exists(out)  # nothing written by a refused prune