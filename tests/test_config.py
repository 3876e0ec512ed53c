"""The argument front end: Megatron-LM's parser, defaults and checks; the plugin's flags; YAML; validation.

Rewritten for the Megatron-LM-native front end (issue 11): flags now take
Megatron-LM's defaults (so a config names what it relies on), Megatron-LM's
required flags are required, and `--eval-interval` became `--eval-every`.
"""
import dataclasses
import math

import pytest
import yaml

from vopd_megatron.config import (
    ConfigError, DistillArgs, ModelArgs, RunConfig, load_yaml_overrides, parse_config, to_flat_dict,
)
from vopd_megatron.config.args import parse_run

#: The flags Megatron-LM requires (a small model); everything else at Megatron-LM's default.
MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
         "--max-position-embeddings", "128", "--micro-batch-size", "1", "--vocab-size", "1000"]
# A config that validates at world size 4 (TP 2 x DP 2); each error case changes one thing.
VALID = MODEL + ["--tensor-model-parallel-size", "2", "--global-batch-size", "8", "--world-size", "4"]
PP2 = ["--pipeline-model-parallel-size", "2"]  # with VALID at world size 4: TP 2 x PP 2


def write_yaml(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return path


def test_megatron_lm_defaults_apply():
    run, ns = parse_config(MODEL)
    m, t = run.model, run.train
    assert (m.hidden_dropout, m.attention_dropout) == (0.1, 0.1)
    assert m.position_embedding_type == "learned_absolute" and m.normalization == "LayerNorm"
    assert m.ffn_hidden_size == 4 * 64 and m.kv_channels == 16 and not m.disable_bias_linear
    assert (t.weight_decay, t.lr_decay_style, t.calculate_per_token_loss) == (0.01, "linear", False)
    assert run.logging.log_interval == 100 and t.lr is None and t.global_batch_size == 1  # mbs x DP
    assert run.teacher == m  # no teacher config: the student's architecture
    assert (ns.config, ns.dry_run, ns.gpu_memory_gb, ns.num_nodes) == (None, False, 80.0, None)


def test_derived_values_follow_megatron_lm():
    swiglu = parse_config(MODEL + ["--hidden-size", "4096", "--num-attention-heads", "32", "--swiglu"])[0].model
    assert swiglu.ffn_hidden_size == 10880  # int(4h * 2/3 / 64) * 64, not 4h
    no_gqa = parse_config(MODEL + ["--num-query-groups", "2"])[0].model
    assert no_gqa.num_query_groups is None and no_gqa.query_groups == 4  # ignored without --group-query-attention
    gqa = parse_config(MODEL + ["--num-query-groups", "2", "--group-query-attention"])[0].model
    assert gqa.num_query_groups == 2


def test_sequence_parallel_at_tp1_warns_and_turns_off(capsys):
    run, _ = parse_config(MODEL + ["--sequence-parallel"])
    assert not run.parallel.sequence_parallel
    assert "warning: Disabling sequence parallelism" in capsys.readouterr().err
    assert parse_config(VALID + ["--sequence-parallel"])[0].parallel.sequence_parallel


def test_flags_map_to_fields_with_types():
    run, ns = parse_config(MODEL + [
        "--num-layers", "6", "--hidden-size", "96", "--ffn-hidden-size", "256", "--vocab-size", "1271",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "3", "--world-size", "6",
        "--lr", "3e-4", "--vopd-loss", "vopd_topk", "--vopd-top-k", "8", "--vopd-temperature", "0.7",
        "--teacher-load", "/ckpt/teacher", "--tensorboard-dir", "/tb", "--rollout-data", "r.jsonl",
        "--normalization", "RMSNorm", "--save", "/ckpt", "--save-interval", "50", "--num-nodes", "2",
        "--gpu-memory-gb", "141", "--decoupled-lr", "1e-3", "--attention-backend", "fused",
    ])
    m, p, t, d = run.model, run.parallel, run.train, run.distill
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.vocab_size) == (6, 96, 256, 1271)
    assert all(type(v) is int for v in (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.vocab_size))
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (2, 3)
    assert type(t.lr) is float and t.lr == 3e-4 and t.megatron_overrides == {"decoupled_lr": 1e-3}
    assert (d.vopd_loss, d.vopd_top_k, d.vopd_temperature) == ("vopd_topk", 8, 0.7)
    assert m.normalization == "RMSNorm" and run.checkpoint.save_interval == 50
    assert run.checkpoint.teacher_load == "/ckpt/teacher"
    assert run.logging.tensorboard_dir == "/tb" and run.data.rollout_data == "r.jsonl"
    assert m.megatron_overrides["attention_backend"].name == "fused"
    assert ns.num_nodes == 2 and ns.gpu_memory_gb == 141.0 and ns.world_size == 6


BOOL_FLAGS = {
    "--swiglu": ("model", "swiglu"), "--bf16": ("train", "bf16"),
    "--use-distributed-optimizer": ("parallel", "use_distributed_optimizer"),
    "--untie-embeddings-and-output-weights": ("model", "untie_embeddings_and_output_weights"),
    "--disable-bias-linear": ("model", "disable_bias_linear"),
    "--qk-layernorm": ("model", "qk_layernorm"), "--calculate-per-token-loss": ("train", "calculate_per_token_loss"),
    "--teacher-fp8": ("distill", "teacher_fp8"), "--apply-chat-template": ("data", "apply_chat_template"),
}


@pytest.mark.parametrize("flag", BOOL_FLAGS)
def test_switches(flag):
    section, name = BOOL_FLAGS[flag]
    assert getattr(getattr(parse_config(MODEL)[0], section), name) is False
    assert getattr(getattr(parse_config(MODEL + [flag])[0], section), name) is True


@pytest.mark.parametrize("argv, needle", [
    (["--num-layer", "4"], "unrecognized arguments: --num-layer"),  # no prefix matching
    (["--num-layers", "four"], "argument --num-layers: invalid int value: 'four'"),
    (["--swiglu", "yes"], "unrecognized arguments: yes"),  # a switch takes no value
    (["--position-embedding-type", "alibi"], "argument --position-embedding-type: invalid choice"),
    (["--num-experts", "8"], "--num-experts is not supported by vopd-train: mixture-of-experts"),
    (["--position-embedding-type", "yarn"], "--position-embedding-type yarn: yarn, mrope and relative"),
    (["--yaml-cfg", "x.yaml"], "--yaml-cfg is not supported by vopd-train: use --config"),
    (["--mock-data"], "--mock-data is not supported by vopd-train: Megatron-LM's pretraining data pipeline"),
])
def test_bad_flags_are_one_line_errors(argv, needle):
    with pytest.raises(ConfigError) as exc:
        parse_config(MODEL + argv)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_missing_required_flags_are_named():
    with pytest.raises(ConfigError, match="missing --num-layers, --hidden-size, --num-attention-heads, "
                                          "--max-position-embeddings"):
        parse_config([])
    with pytest.raises(ConfigError, match="missing --seq-length, --micro-batch-size"):
        parse_run(MODEL[:6] + ["--max-position-embeddings", "128"], tool="train")
    with pytest.raises(ConfigError, match="--lr is required"):
        parse_run(MODEL, tool="train")


def test_megatron_assertions_become_errors_naming_flags():
    with pytest.raises(ConfigError, match=r"Megatron-LM rejects the arguments: .*\(--max-position-embeddings, "
                                          r"--seq-length\)|max_position_embeddings \(64\) must be greater"):
        parse_config(MODEL + ["--max-position-embeddings", "64"])
    with pytest.raises(ConfigError, match=r"--save-interval"):
        parse_config(MODEL + ["--save", "/ckpt"])


def test_batch_size_errors_name_the_flag_that_was_set(tmp_path):
    # validate_args checks the evaluation batch sizes it copied from the training ones first;
    # when they were not given, the error names --global-batch-size, not --eval-global-batch-size.
    base = MODEL + ["--micro-batch-size", "2", "--global-batch-size", "7"]
    with pytest.raises(ConfigError, match=r"^--global-batch-size 7 is not divisible by --micro-batch-size 2 x "
                                          r"data-parallel size 1"):
        parse_config(base)
    with pytest.raises(ConfigError, match=r"eval_global_batch_size \(9\).*\(--eval-global-batch-size"):
        parse_config(MODEL + ["--micro-batch-size", "2", "--global-batch-size", "8", "--eval-global-batch-size", "9"])


def test_missing_teacher_config_names_its_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"^--teacher-model-config: teacher config file \S*nope.yaml not found"):
        parse_config(MODEL + ["--teacher-model-config", str(tmp_path / "nope.yaml")])
    (tmp_path / "bad.yaml").write_text("num-layers: [1\n")
    with pytest.raises(ConfigError, match=r"^--teacher-model-config: teacher config file \S*bad.yaml is not valid"):
        parse_config(MODEL + ["--teacher-model-config", str(tmp_path / "bad.yaml")])


def test_no_effect_flags_warn(capsys):
    run, ns = parse_config(MODEL + ["--log-throughput", "--eval-interval", "10", "--overlap-grad-reduce"])
    err = capsys.readouterr().err
    assert "warning: --log-throughput has no effect in vopd-train" in err
    assert "warning: --eval-interval has no effect in vopd-train" in err and "--eval-every" in err
    assert "warning: --overlap-grad-reduce has no effect" in err and ns.overlap_grad_reduce is False
    assert run.eval.eval_every == 0


def test_help_shows_megatron_and_plugin_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--ffn-hidden-size FFN_HIDDEN_SIZE" in out and "--apply-layernorm-1p" in out
    assert "--teacher-model-config TEACHER_MODEL_CONFIG, --export-kd-teacher-model-config" in out
    assert "--vopd-top-k VOPD_TOP_K k of the top-k modes" in out


# ---------------------------------------------------------------- --config YAML

def test_yaml_config_with_cli_override(tmp_path):
    path = write_yaml(tmp_path, "run.yaml", {
        "num-layers": 4, "hidden_size": 96, "--seq-length": 256, "max-position-embeddings": 256, "lr": "1e-4",
        "swiglu": True, "vopd-loss": "opd", "dry-run": True, "save": None, "num-attention-heads": 4,
        "micro-batch-size": 2, "vocab-size": 1000, "apply_rope_fusion": False, "disable-bias-linear": True,
    })
    run, ns = parse_config(["--config", str(path), "--num-layers", "6", "--vopd-loss", "full_kl"])
    assert run.model.num_layers == 6 and run.distill.vopd_loss == "full_kl"  # CLI wins
    assert run.model.hidden_size == 96 and run.model.seq_length == 256       # YAML over default
    assert run.model.swiglu is True and ns.dry_run is True and run.checkpoint.save is None
    assert type(run.train.lr) is float and run.train.lr == 1e-4  # YAML 1.1 reads 1e-4 as a str
    assert ns.apply_rope_fusion is False and run.model.disable_bias_linear  # dest and flag spellings
    assert run.model.megatron_overrides["apply_rope_fusion"] is False and ns.config == str(path)


def test_yaml_unknown_key_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path, "run.yaml", {"num-layers": 4, "num-layerz": 5, "teacher_laod": "x"})
    with pytest.raises(ConfigError, match="unknown key") as exc:
        parse_config(["--config", str(path)])
    assert "num-layerz" in str(exc.value) and "teacher_laod" in str(exc.value) and str(path) in str(exc.value)


@pytest.mark.parametrize("data, needle", [
    ({"num-layers": "four"}, "argument --num-layers: invalid int value: 'four'"),
    ({"num-layers": 2.5}, "invalid int value: '2.5'"),
    ({"swiglu": "yes"}, "swiglu: expected true or false, got 'yes'"),
    ({"num-layers": True}, "num-layers: expected int, got True"),
    ({"seed": None}, "seed may not be null"),
    ({"normalization": ["RMSNorm"]}, "normalization: expected one value, got a list"),
    ({"num-layers": 4, "num_layers": 5}, "set twice"),
    ("- num-layers\n- 4\n", "must hold a mapping of flag: value, not a list"),
    ("num-layers: [4\n", "not valid YAML"),
    ({"config": "other.yaml"}, "a config file cannot set --config"),
])
def test_yaml_bad_values(tmp_path, data, needle):
    path = write_yaml(tmp_path, "run.yaml", data)
    with pytest.raises(ConfigError, match="run.yaml") as exc:
        parse_config(MODEL + ["--config", str(path)])
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_missing_yaml_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{missing} not found"):
        parse_config(["--config", str(missing)])
    with pytest.raises(ConfigError, match=f"{missing} not found"):
        parse_config(MODEL + ["--teacher-model-config", str(missing)])
    with pytest.raises(ConfigError, match="is a directory"):
        parse_config(["--config", str(tmp_path)])


def test_load_yaml_overrides_normalises_names(tmp_path):
    path = write_yaml(tmp_path, "o.yaml", "num-layers: 4\n--hidden-size: 96\nvopd_top_k: 8\n")
    assert load_yaml_overrides(path) == {"num_layers": 4, "hidden_size": 96, "vopd_top_k": 8}
    assert load_yaml_overrides(write_yaml(tmp_path, "empty.yaml", "")) == {}


# ---------------------------------------------------------------- validation (RunConfig.validate)

def test_base_config_validates():
    run, _ = parse_config(VALID)
    assert run.validate(4) is run and run.num_microbatches(4) == 4


@pytest.mark.parametrize("extra, teacher, world, message", [
    (["--num-attention-heads", "6", "--hidden-size", "96", "--tensor-model-parallel-size", "4"], None, 4,
     "student: --num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    ([], {"vocab-size": 500}, 4, "teacher vocab size 500 != student vocab size 1000"),
    ([], {"make-vocab-size-divisible-by": 100}, 4, "teacher padded vocab size 1000 != the student's 1024"),
    (["--vopd-loss", "foo"], None, 4, "unknown --vopd-loss 'foo'"),
    (["--vopd-loss", "vopd_topk"], None, 4, "--vopd-loss vopd_topk needs --vopd-top-k"),
    (["--vopd-top-k", "4"], None, 4, "--vopd-top-k 4 has no effect with --vopd-loss vopd: only vopd_topk and "
                                     "topk_kl use it"),
    (["--vopd-updates-per-batch", "2"], None, 4, "--vopd-updates-per-batch > 1 needs --vopd-ppo-clip"),
    (["--prompt-data", "p.jsonl", "--rollout-max-new-tokens", "4096"], None, 4,
     "--rollout-max-new-tokens 4096 must be in [1, --seq-length"),
    (["--finetune"], None, 4, "--finetune needs --load"),
    (["--eos-id", "1000"], None, 4, "--eos-id 1000 is outside the vocabulary [0, 1000)"),
    (["--eval-every", "2"], None, 4, "--eval-every needs --eval-data"),
    (["--eval-data", "e.jsonl", "--eval-samples", "2", "--eval-pass-k", "3"], None, 4,
     "--eval-pass-k 3 must be in [1, --eval-samples 2]"),
    (["--eval-data", "e.jsonl", "--eval-max-new-tokens", "128"], None, 4, "--eval-max-new-tokens 128 must be in"),
    # Pipeline stages: Megatron-Core's rule for uneven first/last stages.
    (PP2, {"num-layers": 5}, 4, "teacher: --num-layers 5 is not divisible by PP 2; set "
     "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers for an uneven split"),
    (PP2, {"num-layers": 5, "decoder-first-pipeline-num-layers": 2, "decoder-last-pipeline-num-layers": 2}, 4,
     "teacher: --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers (2 + 2) must add up "
     "to --num-layers 5 at PP 2"),
    (PP2, {"num-layers": 5, "decoder-first-pipeline-num-layers": 5}, 4,
     "leaves 0 layers for the other 1 pipeline stage(s): they must split evenly, at least one layer each"),
])
def test_validate_errors(tmp_path, extra, teacher, world, message):
    """Each is an error before any process group: at parse (the layout) or in RunConfig.validate."""
    argv = VALID + extra
    if teacher is not None:
        argv += ["--teacher-model-config", str(write_yaml(tmp_path, "teacher.yaml", teacher))]
    with pytest.raises(ConfigError) as exc:
        parse_config(argv)[0].validate(world)
    assert message in str(exc.value)


@pytest.mark.parametrize("argv, message", [
    # Issue 16's flag-level classes: ranges and finiteness, before any process group.
    (["--micro-batch-size", "0"], "--micro-batch-size 0 must be >= 1"),
    (["--global-batch-size", "0"], "--global-batch-size 0 must be >= 1"),
    (["--train-iters", "0"], "--train-iters 0 must be >= 1"),
    (["--lr", "nan"], "--lr nan must be a finite number"),
    (["--lr", "inf"], "--lr inf must be a finite number"),
    (["--lr=-1e-4"], "--lr -0.0001 must be >= 0"),
    (["--min-lr=-1"], "--min-lr -1.0 must be >= 0"),
    (["--adam-beta2", "1.0"], "--adam-beta2 1.0 must be in [0, 1)"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout 1.5 must be in [0, 1]"),
    (["--rollout-top-p", "1.5"], "--rollout-top-p 1.5 must be in [0, 1]"),
    (["--rollout-top-k", "-1"], "--rollout-top-k -1 must be >= 0"),
    (["--vopd-temperature", "inf"], "--vopd-temperature inf must be a finite number"),
    (["--vopd-temperature", "0"], "--vopd-temperature 0.0 must be > 0"),
    (["--vopd-temperature", "-1"], "--vopd-temperature -1.0 must be > 0"),
    (["--vopd-ppo-clip", "1.5"], "--vopd-ppo-clip 1.5 must be in (0, 1)"),
    (["--eval-samples", "0"], "--eval-samples 0 must be >= 1"),
    (["--eval-temperature", "nan"], "--eval-temperature nan must be a finite number"),
    (["--eval-every", "-1"], "--eval-every -1 must be >= 0"),
    (["--eos-id", "-2"], "--eos-id -2 must be >= 0"),
])
def test_flag_ranges_are_checked_at_parse(argv, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(MODEL + argv)
    assert str(exc.value) == message


def test_every_numeric_plugin_field_declares_a_range():
    """The class fix: a new int / float field of a plugin section cannot skip range checks."""
    from vopd_megatron.config.plugin_flags import PLUGIN_SECTIONS, plugin_specs

    specs = plugin_specs()
    numeric = [(cls, f) for _, cls in PLUGIN_SECTIONS for f in dataclasses.fields(cls)
               if f.name in specs and specs[f.name].type in (int, float)]
    assert len(numeric) >= 15
    for cls, f in numeric:
        assert "range" in f.metadata, f"{cls.__name__}.{f.name} declares no range"


def test_programmatic_runconfig_is_range_checked():
    run = RunConfig(model=ModelArgs(vocab_size=100), teacher=ModelArgs(vocab_size=100),
                    distill=DistillArgs(vopd_temperature=math.nan))
    with pytest.raises(ConfigError, match="--vopd-temperature nan must be a finite number"):
        run.validate(1)


# ---------------------------------------------------------------- teacher config

def test_teacher_yaml_overrides_shape_keeps_student_vocab(tmp_path):
    path = write_yaml(tmp_path, "teacher.yaml", {"num-layers": 8, "hidden_size": 128, "num-attention-heads": 8})
    run, _ = parse_config(VALID + ["--swiglu", "--teacher-model-config", str(path)])
    assert (run.teacher.num_layers, run.teacher.hidden_size, run.teacher.num_attention_heads) == (8, 128, 8)
    assert (run.model.num_layers, run.model.hidden_size, run.model.num_attention_heads) == (4, 64, 4)
    assert run.teacher.vocab_size == run.model.vocab_size == 1000
    assert run.teacher.swiglu is True and run.teacher.seq_length == run.model.seq_length
    assert run.distill.teacher_model_config == str(path)
    run.validate(4)


def test_teacher_derived_values_follow_its_own_shape(tmp_path):
    """kv_channels and ffn_hidden_size come from the teacher's shape, not the student's flags."""
    student = MODEL + ["--hidden-size", "2048", "--num-attention-heads", "32", "--kv-channels", "64", "--swiglu",
                       "--group-query-attention", "--num-query-groups", "8"]
    eight_b = write_yaml(tmp_path, "t.yaml", {"hidden-size": 4096, "num_layers": 32})
    teacher = parse_config(student + ["--teacher-model-config", str(eight_b)])[0].teacher
    assert (teacher.kv_channels, teacher.ffn_hidden_size) == (128, 10880)
    same_width = write_yaml(tmp_path, "deeper.yaml", {"num-layers": 8})  # same shape: the explicit head dim stays
    assert parse_config(student + ["--teacher-model-config", str(same_width)])[0].teacher.kv_channels == 64


def test_teacher_config_may_only_change_the_architecture(tmp_path):
    path = write_yaml(tmp_path, "teacher.yaml", {"num-layers": 8, "tensor-model-parallel-size": 4})
    with pytest.raises(ConfigError, match="differs from the student's --tensor-model-parallel-size 2") as exc:
        parse_config(VALID + ["--teacher-model-config", str(path)])
    assert "tensor-model-parallel-size" in str(exc.value) and str(path) in str(exc.value)
    same = write_yaml(tmp_path, "same.yaml", {"num-layers": 8, "tensor_model_parallel_size": 2, "lr": 1e-4})
    run, _ = parse_config(VALID + ["--lr", "1e-4", "--teacher-model-config", str(same)])
    assert run.teacher.num_layers == 8
    unknown = write_yaml(tmp_path, "nemo.yaml", {"num_layers": 8, "activation": "fast-swiglu"})
    with pytest.raises(ConfigError, match="unknown key.*activation"):
        parse_config(VALID + ["--teacher-model-config", str(unknown)])


def test_modelopt_flag_names_and_model_config_beside_the_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "teacher_ckpt"
    ckpt.mkdir()
    run, _ = parse_config(VALID + ["--export-kd-teacher-load", str(ckpt)])
    assert run.checkpoint.teacher_load == str(ckpt) and run.teacher.num_layers == 4
    assert "the teacher is built with the student's architecture" in capsys.readouterr().err
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump({"num_layers": 6, "hidden_size": 128}))
    run, _ = parse_config(VALID + ["--export-kd-teacher-load", str(ckpt)])
    assert (run.teacher.num_layers, run.teacher.hidden_size, run.teacher.kv_channels) == (6, 128, 32)
    explicit = write_yaml(tmp_path, "t.yaml", {"num-layers": 2})
    run, _ = parse_config(VALID + ["--export-kd-teacher-load", str(ckpt),
                                   "--export-kd-teacher-model-config", str(explicit)])
    assert run.teacher.num_layers == 2 and run.distill.teacher_model_config == str(explicit)


@pytest.mark.parametrize("teacher, teacher_stages", [
    ({"num-layers": 6}, [1, 2, 2, 1]),  # inherits the student's first/last stage sizes
    ({"num-layers": 8, "decoder-first-pipeline-num-layers": None, "decoder-last-pipeline-num-layers": None},
     [2, 2, 2, 2]),  # null: an even split
    ({"num-layers": 7, "decoder-last-pipeline-num-layers": None}, [1, 2, 2, 2]),
])
def test_uneven_pipeline_stages(tmp_path, teacher, teacher_stages):
    argv = MODEL + ["--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-layers", "1",
                    "--decoder-last-pipeline-num-layers", "1", "--global-batch-size", "8", "--world-size", "8",
                    "--teacher-model-config", str(write_yaml(tmp_path, "teacher.yaml", teacher))]
    run, _ = parse_config(argv)
    run.validate(8)
    assert (run.model.decoder_first_pipeline_num_layers, run.model.decoder_last_pipeline_num_layers) == (1, 1)
    assert run.model.pipeline_stage_layers(4) == [1, 1, 1, 1]
    assert run.teacher.pipeline_stage_layers(4) == teacher_stages


# ---------------------------------------------------------------- to_flat_dict

def test_flat_dict_covers_every_field_and_round_trips(tmp_path):
    teacher = write_yaml(tmp_path, "teacher.yaml", {"num-layers": 8})
    run, _ = parse_config(VALID + ["--bf16", "--lr", "2e-4", "--attention-backend", "flash",
                                   "--teacher-model-config", str(teacher)])
    flat = to_flat_dict(run)
    assert flat["num_layers"] == 4 and flat["teacher.num_layers"] == 8 and flat["attention_backend"] == "flash"
    assert flat["tensor_model_parallel_size"] == 2 and flat["bf16"] is True and flat["lr"] == 2e-4
    student_side = {k: v for k, v in flat.items() if not k.startswith("teacher.")}
    again, _ = parse_config(["--config", str(write_yaml(tmp_path, "resolved.yaml", student_side)), "--world-size", "4"])
    assert again == run
