"""Uneven pipeline stages (--decoder-first/last-pipeline-num-layers) for the co-located teacher.

- `ModelArgs.pipeline_stage_layers` (what validation and the dry run use)
  says the same as Megatron-Core: the layers `get_num_layers_to_build` gives
  each stage, and which splits TransformerConfig refuses.
- The student's gradient is exact when the teacher's stages are uneven: a
  5-layer teacher split 2 + 3 over PP 2 (and TP 2 x PP 2), whose stage
  boundary no longer lines up with the student's 1 + 1, gives the gradient of
  the single-process reference. The machinery is tests/test_train_step.py's
  (one TP1·PP1 checkpoint resharded into each layout, gradients read back at
  TP1·PP1); only the run config differs, swapped in inside each rank.
"""
import pytest

import tests.test_train_step as train_step
from vopd_megatron.config.schema import ConfigError, ModelArgs, ParallelArgs, TrainArgs
from vopd_megatron.model.builder import transformer_config

# --- the split rule against Megatron-Core's ------------------------------------------------------

SPLITS = [  # (num_layers, pp, first, last)
    (5, 2, 2, None), (5, 2, None, 4), (5, 2, 1, 4), (126, 4, 31, 31), (126, 4, 30, None), (8, 4, None, 2),
    (7, 3, 1, None), (6, 4, 2, 2), (8, 4, None, None),
    # Megatron refuses these: first + last != layers at PP 2, nothing left or uneven for the middle, 0 layers.
    (5, 2, 2, 2), (5, 2, 5, None), (8, 4, 2, 1), (9, 5, 1, 4), (6, 3, None, 5), (8, 2, 0, None), (5, 1, 2, None),
]


def _megatron_stage_layers(m: ModelArgs, pp: int):
    """Megatron's answer: layers per stage, or None where TransformerConfig refuses the split."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    try:
        config = transformer_config(m, ParallelArgs(pipeline_model_parallel_size=pp), TrainArgs())
    except ValueError:
        return None
    return [get_num_layers_to_build(config, pp_rank=stage) for stage in range(pp)]


@pytest.mark.parametrize("num_layers, pp, first, last", SPLITS)
def test_stage_layers_follow_megatron(num_layers, pp, first, last):
    m = ModelArgs(num_layers=num_layers, decoder_first_pipeline_num_layers=first,
                  decoder_last_pipeline_num_layers=last)
    expected = _megatron_stage_layers(m, pp)
    if expected is None:
        with pytest.raises(ConfigError, match="--decoder-(first|last)-pipeline-num-layers"):
            m.pipeline_stage_layers(pp)
    else:
        assert m.pipeline_stage_layers(pp) == expected
        assert sum(expected) == num_layers and min(expected) >= 1


@pytest.mark.parametrize("num_layers, pp, first, last, megatron, message", [
    (5, 1, 2, 2, [2], "need --pipeline-model-parallel-size > 1"),  # the last-stage count only
    (5, 3, 3, 3, [3, -1, 3], "leaves -1 layers"),  # a middle stage of no layers, 6 built
])
def test_splits_megatron_gets_wrong_are_refused(num_layers, pp, first, last, megatron, message):
    """Megatron-Core 0.19 accepts these splits and builds a different model: refuse them."""
    m = ModelArgs(num_layers=num_layers, decoder_first_pipeline_num_layers=first,
                  decoder_last_pipeline_num_layers=last)
    assert _megatron_stage_layers(m, pp) == megatron
    with pytest.raises(ConfigError, match=message):
        m.pipeline_stage_layers(pp)


# --- the student's gradient with an uneven teacher --------------------------------------------------

TEACHER = {"teacher_layers": 5, "teacher_first_stage": 2}  # 2 + 3 over two pipeline stages
UNEVEN_LAYOUTS = [(2, 1, 2), (4, 2, 2)]  # (world size, tp, pp): PP2 and TP2·PP2


def test_student_gradients_exact_with_uneven_teacher_stages(gloo_pools, tmp_path):
    for world, tp, pp in UNEVEN_LAYOUTS:
        run = train_step.run_config(tp, pp, **TEACHER).validate(world)
        assert run.teacher.pipeline_stage_layers(pp) == [2, 3] and run.model.pipeline_stage_layers(pp) == [1, 1]
    train_step.check_layouts(gloo_pools, tmp_path, "vopd", UNEVEN_LAYOUTS, **TEACHER)
