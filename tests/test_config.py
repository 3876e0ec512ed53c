"""parse_config: flags -> RunConfig fields, YAML precedence, teacher overrides, validation."""
import dataclasses

import pytest
import yaml

from vopd_megatron.config import (
    ConfigError, DistillArgs, ModelArgs, ParallelArgs, RunConfig, TrainArgs, load_yaml_overrides,
    parse_config, to_flat_dict,
)

# A config that validates at world size 4 (TP 2 x DP 2); each error case changes one thing.
VALID = ["--vocab-size", "1000", "--num-layers", "4", "--num-attention-heads", "4",
         "--tensor-model-parallel-size", "2", "--micro-batch-size", "1", "--global-batch-size", "8"]
PP2 = ["--pipeline-model-parallel-size", "2"]  # with VALID at world size 4: TP 2 x PP 2


def write_yaml(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return path


def test_no_flags_gives_dataclass_defaults():
    cfg, ns = parse_config([])
    assert cfg == RunConfig()  # the teacher defaults to a copy of the student
    assert (ns.config, ns.dry_run, ns.gpu_memory_gb, ns.num_nodes) == (None, False, 80.0, None)


def test_flags_map_to_fields_with_types():
    cfg, ns = parse_config([
        "--num-layers", "6", "--hidden-size", "96", "--ffn-hidden-size", "256", "--vocab-size", "1271",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "3",
        "--lr", "3e-4", "--vopd-loss", "vopd_topk", "--vopd-top-k", "8", "--vopd-temperature", "0.7",
        "--teacher-load", "/ckpt/teacher", "--tensorboard-dir", "/tb", "--rollout-data", "r.jsonl",
        "--normalization", "RMSNorm", "--save-interval", "50",
        "--num-nodes", "2", "--gpu-memory-gb", "141",
    ])
    m, p, t, d = cfg.model, cfg.parallel, cfg.train, cfg.distill
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.vocab_size) == (6, 96, 256, 1271)
    assert all(type(v) is int for v in (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.vocab_size))
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (2, 3)
    assert type(t.lr) is float and t.lr == 3e-4
    assert (d.vopd_loss, d.vopd_top_k, d.vopd_temperature) == ("vopd_topk", 8, 0.7)
    assert m.normalization == "RMSNorm" and cfg.checkpoint.save_interval == 50
    assert cfg.checkpoint.teacher_load == "/ckpt/teacher"
    assert cfg.logging.tensorboard_dir == "/tb" and cfg.data.rollout_data == "r.jsonl"
    assert cfg.teacher == m  # no teacher YAML: same shape as the student
    assert ns.num_nodes == 2 and ns.gpu_memory_gb == 141.0


BOOL_FLAGS = {
    "--swiglu": ("model", "swiglu"), "--bf16": ("train", "bf16"),
    "--sequence-parallel": ("parallel", "sequence_parallel"),
    "--use-distributed-optimizer": ("parallel", "use_distributed_optimizer"),
    "--untie-embeddings-and-output-weights": ("model", "untie_embeddings_and_output_weights"),
    "--disable-bias-linear": ("model", "disable_bias_linear"),
    "--add-qkv-bias": ("model", "add_qkv_bias"), "--qk-layernorm": ("model", "qk_layernorm"),
}


@pytest.mark.parametrize("flag", BOOL_FLAGS)
def test_store_true_flags(flag):
    section, name = BOOL_FLAGS[flag]
    assert getattr(getattr(parse_config([])[0], section), name) is False
    assert getattr(getattr(parse_config([flag])[0], section), name) is True


def test_per_token_loss_defaults_on_and_can_be_turned_off():
    assert parse_config([])[0].train.calculate_per_token_loss is True
    assert parse_config(["--no-calculate-per-token-loss"])[0].train.calculate_per_token_loss is False
    assert parse_config(["--calculate-per-token-loss"])[0].train.calculate_per_token_loss is True


def test_dry_run_flag():
    assert parse_config(["--dry-run"])[1].dry_run is True


@pytest.mark.parametrize("argv, needle", [
    (["--use-mcore-models"], "--use-mcore-models"),       # a Megatron-LM flag we do not support
    (["--add-bias-linear"], "--add-bias-linear"),
    (["--num-layer", "4"], "--num-layer"),                # no prefix matching
    (["--num-layers", "four"], "--num-layers"),           # wrong type
    (["--swiglu", "yes"], "yes"),                         # store_true takes no value
])
def test_bad_flags_are_argparse_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_help_uses_field_docstrings(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--ffn-hidden-size FFN_HIDDEN_SIZE Defaults to 4 * hidden_size" in out
    assert "--teacher-model-config" in out and "YAML of ModelArgs overrides" in out


# ---------------------------------------------------------------- --config YAML

def test_yaml_config_with_cli_override(tmp_path):
    path = write_yaml(tmp_path, "run.yaml", {
        "num-layers": 4, "hidden_size": 96, "--seq-length": 256, "lr": "1e-4",
        "swiglu": True, "vopd-loss": "opd", "dry-run": True, "save": None,
    })
    cfg, ns = parse_config(["--config", str(path), "--num-layers", "6", "--vopd-loss", "full_kl"])
    assert cfg.model.num_layers == 6 and cfg.distill.vopd_loss == "full_kl"  # CLI wins
    assert cfg.model.hidden_size == 96 and cfg.model.seq_length == 256       # YAML over default
    assert cfg.model.swiglu is True and ns.dry_run is True and cfg.checkpoint.save is None
    assert type(cfg.train.lr) is float and cfg.train.lr == 1e-4  # YAML 1.1 reads 1e-4 as a str
    assert cfg.model.num_attention_heads == ModelArgs.num_attention_heads     # untouched default
    assert cfg.teacher == cfg.model and ns.config == str(path)


def test_yaml_unknown_key_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path, "run.yaml", {"num-layers": 4, "num-layerz": 5, "use_mcore_models": True})
    with pytest.raises(ConfigError, match="unknown key") as exc:
        parse_config(["--config", str(path)])
    assert "num-layerz" in str(exc.value) and "use-mcore-models" in str(exc.value)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("data, needle", [
    ({"num-layers": "four"}, "num-layers: expected int, got 'four'"),
    ({"num-layers": 2.5}, "num-layers: expected int"),
    ({"swiglu": "yes"}, "swiglu: expected bool"),
    ({"hidden-size": None}, "hidden-size may not be null"),
    ({"num-layers": 4, "num_layers": 5}, "set twice"),
    ("- num-layers\n- 4\n", "must hold a mapping"),
    ("num-layers: [4\n", "not valid YAML"),
])
def test_yaml_bad_values(tmp_path, data, needle):
    path = write_yaml(tmp_path, "run.yaml", data)
    with pytest.raises(ConfigError, match="run.yaml") as exc:
        parse_config(["--config", str(path)])
    assert needle in str(exc.value)


def test_missing_yaml_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{missing} not found"):
        parse_config(["--config", str(missing)])
    with pytest.raises(ConfigError, match=f"{missing} not found"):
        parse_config(["--teacher-model-config", str(missing)])


def test_load_yaml_overrides_normalises_names(tmp_path):
    path = write_yaml(tmp_path, "o.yaml", "num-layers: 4\n--hidden-size: 96\nvopd_top_k: 8\n")
    assert load_yaml_overrides(path) == {"num_layers": 4, "hidden_size": 96, "vopd_top_k": 8}
    assert load_yaml_overrides(write_yaml(tmp_path, "empty.yaml", "")) == {}


# ---------------------------------------------------------------- teacher YAML

def test_teacher_yaml_overrides_shape_keeps_student_vocab(tmp_path):
    path = write_yaml(tmp_path, "teacher.yaml", {"num-layers": 8, "hidden_size": 128, "num-attention-heads": 8})
    cfg, _ = parse_config(VALID + ["--swiglu", "--teacher-model-config", str(path)])
    assert (cfg.teacher.num_layers, cfg.teacher.hidden_size, cfg.teacher.num_attention_heads) == (8, 128, 8)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (4, 64, 4)
    assert cfg.teacher.vocab_size == cfg.model.vocab_size == 1000
    assert cfg.teacher.swiglu is True and cfg.teacher.seq_length == cfg.model.seq_length
    assert cfg.distill.teacher_model_config == str(path)
    cfg.validate(4)


def test_teacher_yaml_rejects_non_model_keys(tmp_path):
    path = write_yaml(tmp_path, "teacher.yaml", {"num-layers": 8, "tensor-model-parallel-size": 2})
    with pytest.raises(ConfigError, match="unknown key") as exc:
        parse_config(["--teacher-model-config", str(path)])
    assert "tensor-model-parallel-size" in str(exc.value) and str(path) in str(exc.value)


# ---------------------------------------------------------------- validation through parse_config

def test_base_config_validates():
    cfg, _ = parse_config(VALID)
    assert cfg.validate(4) is cfg and cfg.num_microbatches(4) == 4


@pytest.mark.parametrize("extra, teacher, world, message", [
    (["--num-attention-heads", "6", "--hidden-size", "96", "--tensor-model-parallel-size", "4"], None, 4,
     "student: --num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "4", "--num-layers", "2"], None, 4,
     "student: --pipeline-model-parallel-size 4 is larger than --num-layers 2"),
    ([], {"vocab-size": 500}, 4, "teacher vocab size 500 != student vocab size 1000"),
    ([], {"num-attention-heads": 3, "hidden-size": 96}, 4,
     "teacher: --num-attention-heads 3 is not divisible by --tensor-model-parallel-size 2"),
    (["--vopd-loss", "foo"], None, 4, "unknown --vopd-loss 'foo'"),
    (["--vopd-loss", "vopd_topk"], None, 4, "--vopd-loss vopd_topk needs --vopd-top-k"),
    (["--global-batch-size", "6", "--micro-batch-size", "2"], None, 4,
     "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    (["--vopd-updates-per-batch", "2"], None, 4, "--vopd-updates-per-batch > 1 needs --vopd-ppo-clip"),
    (["--prompt-data", "p.jsonl", "--rollout-max-new-tokens", "4096"], None, 4,
     "--rollout-max-new-tokens 4096 must be in [1, --seq-length"),
    # Pipeline stages: Megatron-Core's rule for uneven first/last stages.
    (PP2, {"num-layers": 5}, 4, "teacher: --num-layers 5 is not divisible by PP 2; set "
     "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers for an uneven split"),
    (PP2, {"num-layers": 5, "decoder-first-pipeline-num-layers": 2, "decoder-last-pipeline-num-layers": 2}, 4,
     "teacher: --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers (2 + 2) must add up "
     "to --num-layers 5 at PP 2"),
    (PP2, {"num-layers": 5, "decoder-first-pipeline-num-layers": 5}, 4,
     "leaves 0 layers for the other 1 pipeline stage(s): they must split evenly, at least one layer each"),
    (PP2, {"num-layers": 5, "decoder-last-pipeline-num-layers": 0}, 4,
     "teacher: --decoder-last-pipeline-num-layers 0 must be >= 1"),
    (["--pipeline-model-parallel-size", "4", "--num-layers", "8", "--decoder-first-pipeline-num-layers", "2",
      "--decoder-last-pipeline-num-layers", "1"], None, 8,
     "student: --num-layers 8 minus --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers "
     "(2, 1) leaves 5 layers for the other 2 pipeline stage(s)"),
    ([], {"num-layers": 5, "decoder-first-pipeline-num-layers": 2}, 4,
     "teacher: --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers need "
     "--pipeline-model-parallel-size > 1"),
])
def test_validate_errors(tmp_path, extra, teacher, world, message):
    argv = VALID + extra
    if teacher is not None:
        argv += ["--teacher-model-config", str(write_yaml(tmp_path, "teacher.yaml", teacher))]
    cfg, _ = parse_config(argv)
    with pytest.raises(ConfigError) as exc:
        cfg.validate(world)
    assert message in str(exc.value)


@pytest.mark.parametrize("teacher, teacher_stages", [
    ({"num-layers": 6}, [1, 2, 2, 1]),  # inherits the student's first/last stage sizes
    ({"num-layers": 8, "decoder-first-pipeline-num-layers": None, "decoder-last-pipeline-num-layers": None},
     [2, 2, 2, 2]),  # null: an even split
    ({"num-layers": 7, "decoder-last-pipeline-num-layers": None}, [1, 2, 2, 2]),
])
def test_uneven_pipeline_stages(tmp_path, teacher, teacher_stages):
    argv = VALID + ["--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-layers", "1",
                    "--decoder-last-pipeline-num-layers", "1", "--teacher-model-config",
                    str(write_yaml(tmp_path, "teacher.yaml", teacher))]
    cfg, _ = parse_config(argv)
    cfg.validate(8)
    assert (cfg.model.decoder_first_pipeline_num_layers, cfg.model.decoder_last_pipeline_num_layers) == (1, 1)
    assert cfg.model.pipeline_stage_layers(4) == [1, 1, 1, 1]
    assert cfg.teacher.pipeline_stage_layers(4) == teacher_stages


def test_top_k_fixes_topk_mode():
    cfg, _ = parse_config(VALID + ["--vopd-loss", "vopd_topk", "--vopd-top-k", "16"])
    assert cfg.validate(4).distill.loss_config().top_k == 16


# ---------------------------------------------------------------- to_flat_dict

def test_flat_dict_covers_every_field_and_round_trips(tmp_path):
    teacher = write_yaml(tmp_path, "teacher.yaml", {"num-layers": 8})
    cfg, _ = parse_config(VALID + ["--bf16", "--lr", "2e-4", "--teacher-model-config", str(teacher)])
    flat = to_flat_dict(cfg)
    n_fields = sum(len(dataclasses.fields(getattr(cfg, f.name))) for f in dataclasses.fields(RunConfig))
    assert len(flat) == n_fields  # no two sections share a key
    assert flat["num_layers"] == 4 and flat["teacher.num_layers"] == 8
    assert flat["tensor_model_parallel_size"] == 2 and flat["bf16"] is True and flat["lr"] == 2e-4
    student_side = {k: v for k, v in flat.items() if not k.startswith("teacher.")}
    again, _ = parse_config(["--config", str(write_yaml(tmp_path, "resolved.yaml", student_side))])
    assert again == cfg


def test_section_defaults_are_the_dataclass_defaults():
    flat = to_flat_dict(parse_config([])[0])
    for cls in (ModelArgs, ParallelArgs, TrainArgs, DistillArgs):
        for f in dataclasses.fields(cls):
            assert flat[f.name] == f.default, f.name
