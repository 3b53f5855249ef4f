"""`genrecal run`'s plan (genrecal.runner): derived pipelines, the SFT baseline, the hash chain."""

from __future__ import annotations

import pytest

from genrecal.common.config import Pipeline
from genrecal.common.errors import ConfigError
from genrecal.errors import RunError
from genrecal.plan import RunPlan, materialised_data, sft_stage
from genrecal.runner import RunOptions, StepBuilder


def pipeline_dict(tmp_path, **changes) -> dict:
    stage = {"lr_start": 1e-3, "lr_end": 1e-4, "batch_size": 4, "precision": "fp32"}
    data = {
        "name": "p", "output": str(tmp_path / "out"),
        "teacher": {"tiny": {"kind": "qwen2_vl", "hidden_size": 32, "vocab_size": 600},
                    "dtype": "float32", "device": "cpu"},
        "teacher_finetune": {"steps": 6, "batch_size": 4, "precision": "fp32",
                             "data": {"synthetic": {"n_train": 12, "n_test": 0}}},
        "student": {"tiny": {"kind": "llava_qwen2", "hidden_size": 32}, "dtype": "float32",
                    "device": "cpu"},
        "data": {"synthetic": {"n_train": 4, "n_test": 4}},
        "cache": {"location": str(tmp_path / "out" / "cache")},
        "stages": [{"name": "align", "steps": 3, **stage}, {"name": "distill", "steps": 4, **stage},
                   {"name": "finetune", "steps": 5, **stage}],
        "evaluation": {"split": "test", "max_new_tokens": 2},
    }
    return {**data, **changes}


def make_plan(tmp_path, seeds=(0, 1), **changes) -> RunPlan:
    return RunPlan(Pipeline.from_dict(pipeline_dict(tmp_path, **changes)), tuple(seeds))


def hashes(plan: RunPlan) -> dict[str, str]:
    builder = StepBuilder(plan, RunOptions(progress=False))
    builder.phases()
    return builder.hashes


def test_sft_baseline_takes_the_student_training_steps_with_the_finetune_settings(tmp_path):
    plan = make_plan(tmp_path)
    stage = sft_stage(plan.pipeline)
    assert stage["steps"] == 4 + 5  # distill + finetune; align leaves the student unchanged
    assert stage["lr_start"] == 1e-3 and stage["batch_size"] == 4 and stage["name"] == "finetune"
    sft = plan.sft_pipeline(1)
    assert [s.name for s in sft.stages] == ["finetune"] and sft.stages[0].seed == 1
    assert sft.model_location("student") == plan.seed_pipeline(1).model_location("student")


def test_sft_baseline_sums_epochs_and_refuses_a_mix(tmp_path):
    stages = pipeline_dict(tmp_path)["stages"]
    by_epochs = [{**s, "steps": None, "epochs": 2} for s in stages]
    assert sft_stage(make_plan(tmp_path, stages=by_epochs).pipeline)["epochs"] == 4
    mixed = [stages[0], {**stages[1], "steps": None, "epochs": 1}, stages[2]]
    with pytest.raises(RunError, match="mix 'steps' and 'epochs'"):
        sft_stage(make_plan(tmp_path, stages=mixed).pipeline)


def test_seed_pipelines_vary_the_student_init_and_the_stage_seeds(tmp_path):
    plan = make_plan(tmp_path, seeds=(3, 7))
    for seed in (3, 7):
        pipe = plan.seed_pipeline(seed)
        assert pipe.student.tiny.seed == seed and {s.seed for s in pipe.stages} == {seed}
        assert pipe.output_dir == str(plan.root / f"seed-{seed}")
        assert pipe.cache.location == plan.pipeline.cache.location  # one cache for all seeds
        assert pipe.teacher.source == plan.teacher_dir and pipe.teacher_finetune is None
    assert plan.teacher_dir.endswith("teacher/finetune/student")


def test_teacher_pipeline_trains_the_teacher_on_its_own_data(tmp_path):
    plan = make_plan(tmp_path)
    tp = plan.teacher_pipeline()
    assert tp.student.tiny == tp.teacher.tiny and tp.student.tiny.path == plan.base_teacher_dir
    assert tp.data.synthetic.n_train == 12 and [s.steps for s in tp.stages] == [6]
    assert make_plan(tmp_path, teacher_finetune=None).teacher_pipeline() is None


def test_materialised_data_reads_the_same_samples(tmp_path):
    from genrecal.data import read_split

    plan = make_plan(tmp_path)
    original = read_split(plan.pipeline.data, "train", output_dir=plan.root)
    materialised = Pipeline.from_dict(pipeline_dict(tmp_path, data=materialised_data(plan.pipeline)))
    copy = read_split(materialised.data, "train", output_dir=tmp_path / "elsewhere")
    assert [(s.id, s.content_hash) for s in copy.samples] == \
        [(s.id, s.content_hash) for s in original.samples]


def test_hash_chain_invalidates_exactly_the_steps_downstream(tmp_path):
    base = hashes(make_plan(tmp_path))
    tf = {**pipeline_dict(tmp_path)["teacher_finetune"], "steps": 7}
    changed = hashes(make_plan(tmp_path, teacher_finetune=tf))
    differ = {k for k in base if base[k] != changed[k]}
    assert differ == {"teacher-finetune", "cache", "genrecal-seed-0", "genrecal-seed-1",
                      "eval-teacher", "eval-student_genrecal-seed-0", "eval-student_genrecal-seed-1"}
    cache = pipeline_dict(tmp_path)["cache"]
    faster = hashes(make_plan(tmp_path, cache={**cache, "encode_workers": 2}))
    assert faster == base  # how fast the cache is written is no reason to write it again
    more_seeds = hashes(make_plan(tmp_path, seeds=(0, 1, 2)))
    assert all(more_seeds[k] == v for k, v in base.items())  # a new seed reuses the others
    stages = pipeline_dict(tmp_path)["stages"]
    longer = hashes(make_plan(tmp_path, stages=[*stages[:2], {**stages[2], "steps": 6}]))
    assert {k for k in base if base[k] != longer[k]} == {
        f"{kind}-seed-{s}" for kind in ("genrecal", "sft", "eval-student_genrecal", "eval-student_sft")
        for s in (0, 1)}


@pytest.mark.parametrize("changes, message", [
    ({"evaluation": None}, "needs an evaluation block"),
    ({"stages": [{"name": "align", "steps": 2}]}, "needs a finetune stage"),
])
def test_pipelines_that_cannot_run_end_to_end(tmp_path, changes, message):
    with pytest.raises(RunError, match=message):
        make_plan(tmp_path, **changes)
    with pytest.raises(RunError, match="distinct integers"):
        make_plan(tmp_path, seeds=(1, 1))


def test_teacher_finetune_schema(tmp_path):
    hub = {"source": "Qwen/Qwen2-VL-2B-Instruct", "family": "qwen2_vl"}
    with pytest.raises(ConfigError, match="teacher_finetune: fine-tunes tiny or local teachers"):
        Pipeline.from_dict(pipeline_dict(tmp_path, teacher=hub))
    local = {"source": "./models/teacher", "family": "qwen2_vl"}
    assert Pipeline.from_dict(pipeline_dict(tmp_path, teacher=local)).teacher_finetune.steps == 6
    no_train = {"steps": 3, "data": {"sources": [{"path": "x.jsonl", "split": "test"}]}}
    with pytest.raises(ConfigError, match="teacher_finetune.data.sources: the teacher's data gives "
                                          "no 'train' split"):
        Pipeline.from_dict(pipeline_dict(tmp_path, teacher_finetune=no_train))
    with pytest.raises(ConfigError, match="teacher_finetune.name"):
        Pipeline.from_dict(pipeline_dict(tmp_path, teacher_finetune={"name": "align", "steps": 3}))


def test_a_tiny_model_built_by_extract_from_the_same_spec_is_adopted(tmp_path):
    """`genrecal extract` builds the pipeline's tiny teacher where `genrecal run` would: a later
    run adopts it (same spec, deterministic build); another model there stops the run with a way
    out (the command that removes it)."""
    from genrecal.phases import MarkerBook, run_step
    from genrecal.model.tiny import ensure_tiny_vlm

    plan = make_plan(tmp_path)
    step = next(s for s in StepBuilder(plan, RunOptions(progress=False)).model_steps() if s.id == "model-teacher")
    spec = plan.pipeline.teacher.tiny
    location = step.outputs[0]
    ensure_tiny_vlm(spec.kind, location, **spec.build_kwargs())  # what `genrecal extract` does
    book = MarkerBook(tmp_path / "phases")
    assert run_step(book, step).action == "run" and book.read(step.id).state == "done"
    other = make_plan(tmp_path / "other")
    step = next(s for s in StepBuilder(other, RunOptions(progress=False)).model_steps() if s.id == "model-teacher")
    ensure_tiny_vlm(spec.kind, step.outputs[0], **{**spec.build_kwargs(), "seed": 7})  # another model
    with pytest.raises(RunError, match=f"rm -r {step.outputs[0]}"):
        run_step(MarkerBook(tmp_path / "other" / "phases"), step)


def test_run_settings_a_grace_run_has_no_use_for_are_refused(tmp_path):
    data = pipeline_dict(tmp_path, stages=[{"name": "grace", "steps": 1, "quantize": {"bits": 4}}],
                         student={"tiny": {"kind": "qwen2_vl", "hidden_size": 32}},
                         cache={"location": str(tmp_path / "c"),
                                "features": {"visual_gram": True, "logit_stats": {"temperature": 2.0}}},
                         run={"labelled": 2})
    with pytest.raises(RunError, match="run.labelled and run.grace"):
        RunPlan(Pipeline.from_dict(data), (0,))


def test_study_variants_derive_the_genrecal_stages_with_their_changes(tmp_path):
    """run.variants: each variant is the GenRecal row of the same seed with its changes; only a
    variant that changes what the cache holds gets its own cache; each setting takes effect."""
    variants = [{"name": "reg off", "reg_terms": "off"}, {"name": "kl", "reg_terms": "kl"},
                {"name": "emb", "answer_input": "embedding"},
                {"name": "npe off, 1 block", "reassign_positions": False, "blocks": 1},
                {"name": "int8 z_ql", "question_hidden_codec": "int8"},
                {"name": "INT4", "quantize": {"bits": 4, "group_size": 16}}]
    plan = make_plan(tmp_path, run={"variants": variants})
    rows = plan.variant_rows
    assert rows == ("variant-reg-off", "variant-kl", "variant-emb", "variant-npe-off-1-block",
                    "variant-int8-z-ql", "variant-int4")
    assert plan.rows[-len(rows):] == rows and [plan.title(r) for r in rows] == [v["name"] for v in variants]
    pipes = {r: plan.variant_pipeline(1, r) for r in rows}
    base = plan.seed_pipeline(1)
    assert [s.losses.reg for s in pipes["variant-reg-off"].stages[:2]] == [0.0, 0.0]
    assert [s.losses.reg_terms for s in pipes["variant-kl"].stages[:2]] == ["kl", "kl"]
    assert pipes["variant-emb"].recalibrator.answer_input == "embedding"
    assert pipes["variant-emb"].cache.features.input_embeddings
    npe = pipes["variant-npe-off-1-block"].recalibrator
    assert (npe.reassign_positions, npe.blocks) == (False, 1)
    assert pipes["variant-int8-z-ql"].cache.codecs.question_hidden == "int8"
    quantized = [s.quantize is not None for s in pipes["variant-int4"].stages]
    assert quantized == [False, True, True]  # align trains the Recalibrator alone
    assert plan.model_dirs(1)["variant-int4"] == plan.export_dir(1, "variant-int4")
    for row, pipe in pipes.items():  # same seed, student, data; own output
        assert pipe.student == base.student and pipe.data == base.data
        assert [s.seed for s in pipe.stages] == [1, 1, 1] and pipe.output_dir != base.output_dir
    own = {r for r in rows if plan.variant_cache(r)["location"] != plan.pipeline.cache.location}
    assert own == {"variant-emb", "variant-int8-z-ql"}
    ids = set(hashes(plan))
    assert {"cache-variant-emb", "cache-variant-int8-z-ql", "export-variant-int4-seed-0",
            "eval-variant-kl-seed-1"} <= ids and "cache-variant-kl" not in ids


@pytest.mark.parametrize("variants, match", [
    ([{"name": "a"}, {"name": "a"}], "names two variants"),
    ([{"name": "GenRecal"}], "names two variants"),
    ([{"name": "x", "question_hidden_codec": "f32"}], "not a codec of question_hidden"),
    ([{"name": "x", "reg_terms": "both"}], "reg_terms"),
])
def test_bad_study_variants_are_refused_with_their_path(tmp_path, variants, match):
    with pytest.raises(ConfigError, match=match) as info:
        make_plan(tmp_path, run={"variants": variants})
    assert "run.variants" in str(info.value)
