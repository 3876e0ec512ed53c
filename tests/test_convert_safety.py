"""vopd-convert never damages data and names what is wrong with its input.

Output safety: a non-empty --out is refused unless --overwrite (the issue's
data loss: hf-to-megatron into a training run replaced its iteration
directory and tracker; megatron-to-hf overwrote config.json), input and
output may not overlap, and a conversion that fails leaves nothing behind.
Bad input: one `error: ...` line (exit status 1) naming the file. Every case
runs `vopd-convert`'s `main` in process and checks that no file under the
test's directories changed and no output or staging directory appeared.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.guards import TreeSnapshot, user_error  # noqa: E402
from vopd_megatron.convert.cli import main as convert  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(an HF Llama directory, its conversion): tiny, random, read-only for the tests."""
    root = tmp_path_factory.mktemp("models")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(root / "hf")
    assert convert(["hf-to-megatron", "--hf-dir", str(root / "hf"), "--out", str(root / "mg")]) == 0
    return root / "hf", root / "mg"


def refused(argv, *roots, says, names):
    """`vopd-convert argv` fails with one line naming `names`, and nothing under `roots` changes."""
    snap = TreeSnapshot(*roots)
    message = user_error(convert, argv)
    assert str(names) in message and says in message, message
    assert snap.unchanged()
    return message


def no_debris(parent: Path):
    assert not [p for p in os.listdir(parent) if ".vopd-convert-" in p], os.listdir(parent)


# ----------------------------------------------------------------- output safety

def training_run(path: Path) -> Path:
    """A directory that looks like a vopd-train run: iterations, tracker, logs."""
    (path / "iter_0000100").mkdir(parents=True)
    (path / "iter_0000100" / "common.pt").write_bytes(b"weights of a long run")
    (path / "latest_checkpointed_iteration.txt").write_text("100\n")
    (path / "notes.txt").write_text("do not lose\n")
    return path


def test_hf_to_megatron_refuses_a_training_run(models, tmp_path):
    hf, _ = models
    run = training_run(tmp_path / "run")
    refused(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(run)], tmp_path, hf,
            says="is not empty (iter_0000100, latest_checkpointed_iteration.txt, notes.txt)", names=run)
    no_debris(tmp_path)


def test_megatron_to_hf_refuses_a_non_empty_directory(models, tmp_path):
    _, mg = models
    out = tmp_path / "hf_out"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "mine"}\n')
    refused(["megatron-to-hf", "--load", str(mg), "--out", str(out)], tmp_path, mg,
            says="pass --overwrite to replace this one", names=out)
    no_debris(tmp_path)


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_input_and_output_may_not_overlap(models, tmp_path, where, overwrite):
    _, mg = models
    copy = tmp_path / "ckpt"
    shutil.copytree(mg, copy)
    out = {"same": copy, "inside": copy / "hf", "parent": tmp_path}[where]
    refused(["megatron-to-hf", "--load", str(copy), "--out", str(out), *(["--overwrite"] if overwrite else [])],
            tmp_path, says="overlap", names=copy)


def test_out_is_a_file(models, tmp_path):
    hf, _ = models
    out = tmp_path / "out"
    out.write_text("a file\n")
    refused(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out)], tmp_path, hf,
            says="exists and is not a directory", names=out)


def test_overwrite_replaces_only_after_success(models, tmp_path):
    hf, mg = models
    run = training_run(tmp_path / "run")
    assert convert(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(run), "--overwrite"]) == 0
    assert sorted(os.listdir(run)) == ["iter_0000000", "latest_checkpointed_iteration.txt", "model_flags.yaml"]
    assert (run / "latest_checkpointed_iteration.txt").read_text() == "0\n"
    no_debris(tmp_path)
    # A failing conversion with --overwrite leaves the old directory exactly as it was.
    old = training_run(tmp_path / "old")
    broken = tmp_path / "broken"
    shutil.copytree(mg, broken)
    victim = next(p for p in (broken / "iter_0000000").iterdir() if p.suffix == ".distcp")
    victim.write_bytes(victim.read_bytes()[:100])
    refused(["megatron-to-hf", "--load", str(broken), "--out", str(old), "--overwrite"], tmp_path,
            says="is truncated", names=victim)
    no_debris(tmp_path)


# ----------------------------------------------------------------- bad input, hf-to-megatron

def hf_copy(models, tmp_path: Path, case: str) -> tuple[Path, Path, str]:
    """(--hf-dir, the file the message must name, what it must say) for a damaged copy of the HF model."""
    hf = tmp_path / "hf"
    shutil.copytree(models[0], hf)
    cfg_path = hf / "config.json"
    cfg = json.loads(cfg_path.read_text())
    weights = hf / "model.safetensors"
    if case == "missing-dir":
        shutil.rmtree(hf)
        return hf, hf, "does not exist"
    if case == "dir-is-a-file":
        shutil.rmtree(hf)
        hf.write_text("not a directory")
        return hf, hf, "is a file; expected a Hugging Face model directory"
    if case == "config-not-json":
        cfg_path.write_text(cfg_path.read_text()[:40])
        return hf, cfg_path, "is not valid JSON"
    if case == "config-a-list":
        cfg_path.write_text("[1, 2]")
        return hf, cfg_path, "expected a JSON object, got list"
    if case == "config-missing-field":
        del cfg["num_hidden_layers"]
        cfg_path.write_text(json.dumps(cfg))
        return hf, cfg_path, "missing field 'num_hidden_layers'"
    if case == "config-wrong-type":
        cfg["num_attention_heads"] = "four"
        cfg_path.write_text(json.dumps(cfg))
        return hf, cfg_path, "wrong type or value"
    if case == "more-layers-than-weights":
        cfg["num_hidden_layers"] = 3
        cfg_path.write_text(json.dumps(cfg))
        return hf, "'model.layers.2.input_layernorm.weight' not found", "does config.json match the weights?"
    if case == "fewer-layers-than-weights":
        cfg["num_hidden_layers"] = 1
        cfg_path.write_text(json.dumps(cfg))
        return hf, "model.layers.1.", "config.json does not account for"
    if case == "shape-mismatch":
        cfg["intermediate_size"] = 64
        cfg_path.write_text(json.dumps(cfg))
        return hf, weights, "has shape (48, 32), config.json implies (64, 32)"
    if case == "truncated-safetensors":
        weights.write_bytes(weights.read_bytes()[:-1000])
        return hf, weights, "cannot read the safetensors header (corrupt or truncated?)"
    if case == "bad-index":
        (hf / "model.safetensors.index.json").write_text('{"weight_map": ')
        return hf, hf / "model.safetensors.index.json", "is not valid JSON"
    if case == "quantized-tensor":
        tensors = load_file(str(weights))
        tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)
        save_file(tensors, str(weights), metadata={"format": "pt"})
        return hf, weights, "'model.norm.weight' is stored as I8"
    raise AssertionError(case)


HF_CASES = ["missing-dir", "dir-is-a-file", "config-not-json", "config-a-list", "config-missing-field",
            "config-wrong-type", "more-layers-than-weights", "fewer-layers-than-weights", "shape-mismatch",
            "truncated-safetensors", "bad-index", "quantized-tensor"]


@pytest.mark.parametrize("case", HF_CASES)
def test_bad_hf_input(models, tmp_path, case):
    hf, names, says = hf_copy(models, tmp_path, case)
    out = tmp_path / "out"
    refused(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out)], tmp_path, says=says, names=names)
    assert not out.exists()
    no_debris(tmp_path)


# ----------------------------------------------------------------- bad input, megatron-to-hf

def mg_copy(models, tmp_path: Path, case: str) -> tuple[list[str], str, str]:
    """(argv, the file the message must name, what it must say) for a damaged copy of the checkpoint."""
    mg = tmp_path / "mg"
    shutil.copytree(models[1], mg)
    it = mg / "iter_0000000"
    if case == "missing-load":
        shutil.rmtree(mg)
        return ["--load", str(mg)], mg, "does not exist"
    if case == "load-is-a-file":
        shutil.rmtree(mg)
        mg.write_text("x")
        return ["--load", str(mg)], mg, "is a file; expected a checkpoint directory"
    if case == "no-checkpoint":
        shutil.rmtree(mg)
        mg.mkdir()
        return ["--load", str(mg)], mg, "holds no complete torch_dist checkpoint"
    if case == "deleted-shard":
        victim = next(p for p in it.iterdir() if p.suffix == ".distcp")
        victim.unlink()
        return ["--load", str(mg)], victim, "is missing (listed in"
    if case == "damaged-common":
        (it / "common.pt").write_bytes(b"not a pickle")
        return ["--load", str(mg)], it, "the common state of"
    if case == "flags-disagree":
        flags = (mg / "model_flags.yaml").read_text().replace("num-layers: 2", "num-layers: 3")
        (tmp_path / "flags.yaml").write_text(flags)
        return ["--load", str(mg), "--config", str(tmp_path / "flags.yaml")], it, "has 2 layers, the flags say 3"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing-load", "load-is-a-file", "no-checkpoint", "deleted-shard",
                                  "damaged-common", "flags-disagree"])
def test_bad_megatron_input(models, tmp_path, case):
    argv, names, says = mg_copy(models, tmp_path, case)
    out = tmp_path / "out"
    refused(["megatron-to-hf", *argv, "--out", str(out)], tmp_path, says=says, names=names)
    assert not out.exists()
    no_debris(tmp_path)
