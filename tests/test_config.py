"""pipelines.yaml schema: shipped pipelines, error reporting (paths, lines, all at once),
cross-field checks, defaults, round trips."""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path

import pytest
import yaml

from genrecal.common import config, vocabulary
from genrecal.common.errors import ConfigError

REPO_FILE = Path(__file__).resolve().parents[1] / "pipelines.yaml"
SHIPPED = list(config.load_pipelines(REPO_FILE).pipelines)


def minimal_pipeline(**overrides) -> dict:
    """A small valid pipeline; keyword arguments replace top-level keys."""
    pipeline = {
        "teacher": {"tiny": {"kind": "qwen2_vl", "hidden_size": 64, "num_heads": 4}},
        "student": {"tiny": {"kind": "llava_qwen2", "hidden_size": 32, "num_heads": 2,
                             "num_layers": 2}},
        "data": {"synthetic": {"n_train": 8, "n_test": 4}},
        "cache": {"location": "memory://cache"},
        "stages": [{"name": "align", "steps": 5}, {"name": "distill", "steps": 5},
                   {"name": "finetune", "steps": 5}],
    }
    pipeline.update(overrides)
    return pipeline


def write(tmp_path: Path, text_or_pipelines, name: str = "pipelines.yaml") -> Path:
    """Write raw YAML text, or ``{"pipelines": <dict>}`` dumped as YAML."""
    path = tmp_path / name
    if isinstance(text_or_pipelines, str):
        path.write_text(text_or_pipelines)
    else:
        path.write_text(yaml.safe_dump({"pipelines": text_or_pipelines}, sort_keys=False))
    return path


def line_of(path: Path, needle: str) -> int:
    """1-based number of the first line of ``path`` that contains ``needle``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def problems(path: Path, name: str | None = None) -> dict[str, str]:
    """yaml path -> message of every problem that loading ``path`` reports."""
    with pytest.raises(ConfigError) as info:
        config.load_pipelines(path) if name is None else config.get_pipeline(name, path)
    assert info.value.source == str(path)
    found = dict(info.value.problems)
    assert len(found) == len(info.value.problems), "each path is reported once"
    return found


# ---------------------------------------------------------------- shipped pipelines

@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_pipeline_validates_and_round_trips(name):
    pipeline = config.get_pipeline(name, REPO_FILE)
    assert pipeline.name == name
    assert config.Pipeline.from_dict(pipeline.to_dict()) == pipeline
    assert config.load_pipelines(REPO_FILE).pipelines[name] == pipeline


def test_shipped_file_declares_the_required_pipelines():
    assert {"demo", "internvl2_5-78b_to_qwen2-vl-2b", "qwen2-vl-72b_to_qwen2-vl-7b",
            "llava-1.5-13b_to_llava-1.5-7b"} <= set(SHIPPED)


def test_packaged_default_is_the_top_level_file(tmp_path, monkeypatch):
    packaged = resources.files("genrecal").joinpath("pipelines.yaml")
    assert packaged.read_text() == REPO_FILE.read_text()
    monkeypatch.chdir(tmp_path)  # no ./pipelines.yaml here
    assert config.load_pipelines() == config.load_pipelines(REPO_FILE)
    assert "packaged default" in config.pipelines_source()


def test_a_pipelines_file_in_the_working_directory_wins(tmp_path, monkeypatch):
    write(tmp_path, {"mine": minimal_pipeline()})
    monkeypatch.chdir(tmp_path)
    assert list(config.load_pipelines().pipelines) == ["mine"]
    assert config.pipelines_source() == str(tmp_path / "pipelines.yaml")


def test_demo_runs_tiny_models_on_cpu_through_the_three_stages():
    demo = config.get_pipeline("demo", REPO_FILE)
    for spec in (demo.teacher, demo.student):
        assert spec.tiny is not None and spec.device == "cpu"
        assert spec.family == vocabulary.TINY_KINDS[spec.tiny.kind]
    assert demo.teacher.family != demo.student.family  # cross-architecture
    assert [s.name for s in demo.stages] == ["align", "distill", "finetune"]
    assert all(s.steps is not None and s.precision == "fp32" for s in demo.stages)
    assert demo.data.synthetic is not None and demo.data.synthetic.n_test > 0
    assert demo.model_location("teacher") == "runs/demo/models/teacher"


@pytest.mark.parametrize("name", ["internvl2_5-78b_to_qwen2-vl-2b", "qwen2-vl-72b_to_qwen2-vl-7b"])
def test_genrecal_pipelines_use_the_paper_setup(name):
    pipeline = config.get_pipeline(name, REPO_FILE)
    assert pipeline.teacher.source and "/" in pipeline.teacher.source
    assert not pipeline.teacher.trust_remote_code
    assert [s.name for s in pipeline.stages] == ["align", "distill", "finetune"]
    for stage in pipeline.stages:
        assert (stage.lr_start, stage.lr_end, stage.epochs) == (1e-4, 1e-5, 1)
        assert stage.precision == "bf16" and stage.global_batch * 8 >= 4096
    assert pipeline.recalibrator.blocks == 2
    assert pipeline.stage("distill").losses.ce_student == 1.0
    assert pipeline.cache.features.question_hidden == "all"


def test_grace_pipeline_uses_the_paper_values():
    pipeline = config.get_pipeline("llava-1.5-13b_to_llava-1.5-7b", REPO_FILE)
    (stage,) = pipeline.stages
    assert isinstance(stage, config.GraceStage)
    assert (stage.quantize.bits, stage.quantize.group_size) == (4, 128)
    assert (stage.controller.tau, stage.controller.eta, stage.controller.beta_init) == (3.0, 0.003, 0.5)
    assert (stage.rcka.omega, stage.rcka.warmup_steps, stage.gdkd.temperature) == (3.0, 400, 2.0)
    assert not stage.trains.vision_encoder
    assert pipeline.cache.features.logit_stats.temperature == stage.gdkd.temperature
    assert pipeline.teacher.family == pipeline.student.family == "llava"


# ---------------------------------------------------------------- file-level errors

def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert "file not found" in problems(path)["<file>"]


def test_directory_instead_of_file(tmp_path):
    assert "directory" in problems(tmp_path)["<file>"]


def test_empty_file(tmp_path):
    assert "empty" in problems(write(tmp_path, "# nothing\n"))["<file>"]


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "pipelines:\n  demo:\n    teacher: {source: x\n    student: y\n")
    message = problems(path)["<file>"]
    assert "YAML syntax error at line 4, column 12" in message
    assert "started at line 3" in message


def test_two_yaml_documents_are_rejected(tmp_path):
    assert "single document" in problems(write(tmp_path, "a: 1\n---\nb: 2\n"))["<file>"]


def test_python_tags_are_not_constructed(tmp_path):
    path = write(tmp_path, "pipelines: !!python/object/apply:os.system ['true']\n")
    assert "YAML syntax error" in problems(path)["<file>"]


def test_top_level_must_be_a_pipelines_mapping(tmp_path):
    assert "expected a mapping" in problems(write(tmp_path, "- 1\n- 2\n"))["<top level>"]
    found = problems(write(tmp_path, "pipeline: {}\n"))
    assert "required key 'pipelines' is missing" in found["pipelines"]
    assert "unknown key 'pipeline' (did you mean 'pipelines'?)" in found["pipeline"]


# ---------------------------------------------------------------- key and value errors

def test_unknown_key_names_path_allowed_keys_and_line(tmp_path):
    pipeline = minimal_pipeline()
    pipeline["stages"][1]["lr_strat"] = 1e-3
    path = write(tmp_path, {"demo": pipeline})
    found = problems(path)
    message = found["pipelines.demo.stages[1].lr_strat"]
    assert "unknown key 'lr_strat' (did you mean 'lr_start'?)" in message
    assert "allowed keys: name, lr_start, lr_end, warmup" in message
    assert "losses" in message  # a distill stage's keys, not another stage type's
    assert message.endswith(f"(line {line_of(path, 'lr_strat')})")
    assert len(found) == 1


def test_bad_value_names_path_expected_form_and_got(tmp_path):
    pipeline = minimal_pipeline()
    pipeline["stages"][1]["lr_start"] = -1
    pipeline["teacher"]["dtype"] = "float64"
    found = problems(write(tmp_path, {"demo": pipeline}))
    assert found["pipelines.demo.stages[1].lr_start"].startswith(
        "Input should be greater than 0; got -1")
    assert "'float32', 'bfloat16' or 'float16'; got 'float64'" in found["pipelines.demo.teacher.dtype"]


def test_missing_key_names_the_expected_form(tmp_path):
    pipeline = minimal_pipeline()
    del pipeline["cache"]
    message = problems(write(tmp_path, {"demo": pipeline}))["pipelines.demo.cache"]
    assert message.startswith("required key 'cache' is missing; expected a mapping with keys location")


def test_unknown_stage_type(tmp_path):
    pipeline = minimal_pipeline(stages=[{"name": "pretrain", "steps": 1}, {"steps": 1}])
    found = problems(write(tmp_path, {"demo": pipeline}))
    assert "unknown stage 'pretrain'" in found["pipelines.demo.stages[0].name"]
    assert "required key 'name' is missing" in found["pipelines.demo.stages[1].name"]


def test_union_value_names_every_accepted_form(tmp_path):
    pipeline = minimal_pipeline(teacher={"source": "a/b", "family": "llava", "device_map": 5})
    message = problems(write(tmp_path, {"demo": pipeline}))["pipelines.demo.teacher.device_map"]
    assert message.startswith("expected a string or a mapping; got 5")


def test_several_errors_are_reported_at_once_in_file_order(tmp_path):
    pipeline = minimal_pipeline()
    pipeline["teacher"]["colour"] = "red"
    pipeline["cache"]["batch_size"] = 0
    pipeline["stages"][0].update(epochs=1)  # steps and epochs
    pipeline["stages"][2]["precision"] = "fp16"
    other = minimal_pipeline(data={"on_error": "ignore", "synthetic": {}})
    found = problems(write(tmp_path, {"demo": pipeline, "other": other}))
    assert list(found) == [
        "pipelines.demo.teacher.colour",
        "pipelines.demo.cache.batch_size",
        "pipelines.demo.stages[0].steps",
        "pipelines.demo.stages[2].precision",
        "pipelines.other.data.on_error",
    ]


@pytest.mark.parametrize("given, got", [({"steps": 3, "epochs": 1}, "both"), ({}, "neither")])
def test_exactly_one_of_steps_or_epochs(tmp_path, given, got):
    pipeline = minimal_pipeline(stages=[{"name": "finetune", **given}])
    message = problems(write(tmp_path, {"demo": pipeline}))["pipelines.demo.stages[0].steps"]
    assert message.startswith(f"set exactly one of 'steps' or 'epochs' (got {got})")


def test_warmup_must_be_shorter_than_the_stage(tmp_path):
    pipeline = minimal_pipeline(stages=[{"name": "finetune", "steps": 4, "warmup": 4}])
    assert "smaller than steps" in problems(write(tmp_path, {"d": pipeline}))["pipelines.d.stages[0].warmup"]


def test_stage_names_unique_and_ordered(tmp_path):
    stages = [{"name": "distill", "steps": 1}, {"name": "align", "steps": 1},
              {"name": "distill", "steps": 1}]
    found = problems(write(tmp_path, {"demo": minimal_pipeline(stages=stages)}))
    assert "out of order" in found["pipelines.demo.stages[1].name"]
    assert "appears twice" in found["pipelines.demo.stages[2].name"]


def test_duplicate_yaml_keys_are_reported(tmp_path):
    text = REPO_FILE.read_text() + "  demo:\n    teacher: {}\n"
    message = problems(write(tmp_path, text))["pipelines.demo"]
    assert "duplicate key 'demo'" in message and "first at line" in message


def test_exponent_without_dot_is_a_number(tmp_path):
    text = yaml.safe_dump({"pipelines": {"d": minimal_pipeline()}}, sort_keys=False)
    text = re.sub(r"^( *)steps: 5$", r"\1steps: 5\n\1lr_start: 3e-4", text, count=1, flags=re.M)
    assert config.load_pipelines(write(tmp_path, text)).pipelines["d"].stages[0].lr_start == 3e-4


def test_anchors_merge_and_x_keys_are_ignored(tmp_path):
    text = (
        "x-stage: &stage {steps: 7, lr_start: 2e-3}\n"
        "pipelines:\n"
        "  d:\n"
        + "".join(f"    {line}\n" for line in yaml.safe_dump(
            {k: v for k, v in minimal_pipeline().items() if k != "stages"}).splitlines())
        + "    stages:\n"
        "      - {<<: *stage, name: align}\n"
        "      - {<<: *stage, name: distill, lr_start: 1e-3, epochs: 1}\n"
    )
    path = write(tmp_path, text)
    # a merged key reports the line of the mapping that merges it
    assert problems(path)["pipelines.d.stages[1].steps"].endswith(f"(line {len(text.splitlines())})")
    loaded = config.load_pipelines(write(tmp_path, text.replace(", epochs: 1", "")))
    align, distill = loaded.pipelines["d"].stages
    assert (align.steps, align.lr_start, distill.lr_start) == (7, 2e-3, 1e-3)


def test_name_inside_a_pipeline_must_match_its_key(tmp_path):
    found = problems(write(tmp_path, {"demo": minimal_pipeline(name="other")}))
    assert "must equal the pipeline's key 'demo'" in found["pipelines.demo.name"]


def test_pipeline_names_are_checked(tmp_path):
    found = problems(write(tmp_path, {"bad name": minimal_pipeline()}))
    assert "invalid pipeline name" in found["pipelines['bad name'].name"]


# ---------------------------------------------------------------- get_pipeline

def test_get_pipeline_ignores_a_broken_sibling(tmp_path):
    path = write(tmp_path, {"good": minimal_pipeline(), "bad": minimal_pipeline(cache={})})
    assert config.get_pipeline("good", path).name == "good"
    assert list(problems(path, "bad")) == ["pipelines.bad.cache.location"]


def test_get_pipeline_unknown_name_lists_the_pipelines(tmp_path):
    path = write(tmp_path, {"a": minimal_pipeline(), "b": minimal_pipeline()})
    assert "no pipeline named 'c'; the file has 'a', 'b'" in problems(path, "c")["pipelines.c"]


def test_get_pipeline_without_pipelines_mapping(tmp_path):
    found = problems(write(tmp_path, "pipelines: 3\n"), "demo")
    assert "'pipelines:' mapping" in found["pipelines"]


# ---------------------------------------------------------------- models and cross-field checks

def test_family_comes_from_the_tiny_kind():
    spec = config.ModelSpec.from_dict({"tiny": {"kind": "llava_qwen2", "seed": 3}})
    assert spec.family == "llava" and config.ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.tiny.build_kwargs() == {"seed": 3}  # sizes left to the kit's defaults


def test_the_family_registry_has_one_family_per_name():
    from genrecal.model.families import FAMILIES

    assert list(FAMILIES) == list(vocabulary.FAMILY_NAMES)


def test_the_codec_type_lists_every_feature_codec_and_the_store_uses_them():
    from genrecal.store import schema

    assert schema.FEATURE_CODECS is vocabulary.FEATURE_CODECS  # one owner
    assert set(config.Codec.__args__) == {c for cs in vocabulary.FEATURE_CODECS.values() for c in cs}


@pytest.mark.parametrize("feature, codec", [
    (feature, codec) for feature, allowed in vocabulary.FEATURE_CODECS.items()
    for codec in config.Codec.__args__ if codec not in allowed])
def test_codecs_refuse_what_the_cache_cannot_store(feature, codec):
    with pytest.raises(ConfigError) as err:
        config.Codecs.from_dict({feature: codec})
    found = dict(err.value.problems)
    assert list(found) == [feature]
    assert found[feature].startswith(f"{codec!r} is not a codec of {feature}")


@pytest.mark.parametrize("feature", sorted(vocabulary.FEATURE_CODECS))
def test_codecs_accept_every_codec_the_cache_stores(feature):
    for codec in vocabulary.FEATURE_CODECS[feature]:
        assert getattr(config.Codecs.from_dict({feature: codec}), feature) == codec


def test_tiny_kinds_agree_with_the_kit():
    from genrecal.model.tiny import KINDS

    assert set(vocabulary.TINY_KINDS) == set(KINDS)
    for kind, recipe in KINDS.items():  # the family is the model_type of the config it builds
        built = recipe.build_config(recipe.defaults, lambda token: 3)
        assert vocabulary.TINY_KINDS[kind] == built.model_type


@pytest.mark.parametrize("spec, path, words", [
    ({}, "source", "set exactly one of 'source'"),
    ({"source": "a", "tiny": {"kind": "gemma3"}}, "source", "set exactly one of 'source'"),
    ({"source": "a"}, "family", "required with 'source'"),
    ({"tiny": {"kind": "llava_llama"}, "family": "gemma3"}, "family", "contradicts tiny.kind"),
    ({"tiny": {"kind": "llava"}}, "tiny.kind", "'qwen2_vl', 'qwen2_5_vl', 'llava_qwen2'"),
    ({"source": "a", "family": "llava", "device": "cpu", "device_map": "auto"},
     "device_map", "not both"),
    ({"source": "a", "family": "gpt2"}, "family", "'qwen2_vl', 'qwen2_5_vl'"),
    ({"tiny": {"kind": "gemma3", "hidden_size": 30, "num_heads": 4}}, "tiny.hidden_size",
     "divisible by num_heads"),
    ({"tiny": {"kind": "gemma3", "num_heads": 4, "num_kv_heads": 3}}, "tiny.num_heads",
     "divisible by num_kv_heads"),
])
def test_model_spec_problems(spec, path, words):
    with pytest.raises(ConfigError) as info:
        config.ModelSpec.from_dict(spec, source="spec")
    found = dict(info.value.problems)
    assert words in found[path], found
    assert info.value.source == "spec"


def test_trust_remote_code_is_off_by_default():
    assert not config.ModelSpec.from_dict({"source": "x", "family": "llava"}).trust_remote_code


def test_stage_type_defaults_merge_with_the_given_keys():
    pipeline = config.Pipeline.from_dict({"name": "p", **minimal_pipeline(stages=[
        {"name": "align", "steps": 1},
        {"name": "distill", "steps": 1, "trains": {"student_head": True}, "losses": {"reg": 0}},
        {"name": "finetune", "steps": 1}])})
    align, distill, finetune = pipeline.stages
    assert align.trains.recalibrator and not align.trains.student_parts()
    assert align.losses.ce_student == 0
    assert distill.trains.recalibrator and distill.trains.student_parts() == ["student_body", "student_head"]
    assert (distill.losses.reg, distill.losses.ce_student, distill.losses.ar) == (0, 1.0, 1.0)
    assert not finetune.trains.recalibrator and not finetune.trains.vision_encoder
    assert set(finetune.trains.student_parts()) == {"projector", "student_body",
                                                    "student_embeddings", "student_head"}


@pytest.mark.parametrize("change, path, words", [
    ({"cache": {"location": "m", "features": {"answer_hidden": False}}},
     "cache.features.answer_hidden", "stages[0] (align), stages[1] (distill) feed z_al"),
    ({"cache": {"location": "m", "features": {"question_hidden": "none"}}},
     "cache.features.question_hidden", "use L_reg"),
    ({"recalibrator": {"answer_input": "embedding"}}, "cache.features.input_embeddings",
     "must be true"),
    ({"recalibrator": {"blocks": 3}}, "recalibrator.blocks", "but it has 2"),
    ({"evaluation": {"split": "val"}}, "evaluation.split", "'val' is not given"),
    ({"data": {"sources": [{"path": "x.json", "split": "test"}]}}, "data.sources",
     "'train' split"),
    ({"stages": [{"name": "finetune", "steps": 1, "trains": {"recalibrator": True}}]},
     "stages[0].trains.recalibrator", "not used"),
    ({"stages": [{"name": "align", "steps": 1, "losses": {"ar": 0, "kl": 0, "reg": 0}}]},
     "stages[0].losses", "every loss weight is 0"),
    ({"stages": [{"name": "align", "steps": 1, "losses": {"ce_student": 1}}]},
     "stages[0].losses.ce_student", "trainable student part"),
    ({"stages": [{"name": "finetune", "steps": 1, "trains": {
        "projector": False, "student_body": False, "student_embeddings": False,
        "student_head": False}}]}, "stages[0].trains", "trains nothing"),
])
def test_pipeline_cross_field_problems(change, path, words):
    with pytest.raises(ConfigError) as info:
        config.Pipeline.from_dict({"name": "p", **minimal_pipeline(**change)})
    found = dict(info.value.problems)
    assert words in found[path], found


def grace_pipeline(features: dict, **stage) -> dict:
    return {"name": "g", **minimal_pipeline(
        student={"tiny": {"kind": "qwen2_vl", "hidden_size": 32}},
        cache={"location": "/tmp/c", "features": features},
        stages=[{"name": "grace", "steps": 1, **stage}])}


def test_grace_needs_its_cache_features_and_one_tokenizer():
    good = {"answer_hidden": False, "question_hidden": "none", "visual_gram": True,
            "logit_stats": {"top_k": 64, "temperature": 2.0}}
    assert config.Pipeline.from_dict(grace_pipeline(good)).stages[0].quantize is None  # QAT is opt-in
    assert config.Pipeline.from_dict(grace_pipeline(good, quantize={"bits": 8})).stages[0].quantize.bits == 8
    with pytest.raises(ConfigError) as info:
        config.Pipeline.from_dict(grace_pipeline(
            {**good, "visual_gram": False, "logit_stats": {"temperature": 1.0}}))
    found = dict(info.value.problems)
    assert "rcka.omega > 0" in found["cache.features.visual_gram"]
    assert "gdkd.temperature (2.0)" in found["cache.features.logit_stats.temperature"]
    with pytest.raises(ConfigError, match="no Recalibrator"):
        config.Pipeline.from_dict(grace_pipeline(good, trains={"recalibrator": True}))
    mixed = grace_pipeline(good)
    mixed["student"] = {"source": "Qwen/Qwen2-VL-2B-Instruct", "family": "qwen2_vl"}
    mixed["teacher"] = {"source": "llava-hf/llava-1.5-13b-hf", "family": "llava"}
    with pytest.raises(ConfigError, match="same family and tokenizer"):
        config.Pipeline.from_dict(mixed)


@pytest.mark.parametrize("block, path", [
    ({"controller": {"beta_init": 2.0}}, "stages[0].controller.beta_init"),
    ({"quantize": {"bits": 3}}, "stages[0].quantize.bits"),
    ({"quantize": {"modules": []}}, "stages[0].quantize.modules"),
    ({"quantize": {"modules": ["q_proj", "lm_head"]}}, "stages[0].quantize.modules[1]"),
    ({"controller": {"ema": 1.0}}, "stages[0].controller.ema"),
])
def test_grace_block_problems(block, path):
    features = {"visual_gram": True}
    with pytest.raises(ConfigError) as info:
        config.Pipeline.from_dict(grace_pipeline(features, **block))
    assert path in dict(info.value.problems)


def test_bf16_grace_has_no_quantisation_and_any_stage_may_quantize():
    pipeline = config.Pipeline.from_dict(grace_pipeline({"visual_gram": True, "logit_stats": {"temperature": 2.0}},
                                                        quantize=None))
    assert pipeline.stages[0].quantize is None
    for name in ("align", "distill", "finetune"):
        stage = config.FinetuneStage if name == "finetune" else (config.AlignStage if name == "align" else config.DistillStage)
        assert stage.from_dict({"name": name, "steps": 1, "quantize": {"bits": 8}}).quantize.bits == 8


@pytest.mark.parametrize("location, ok", [
    ("runs/demo/cache", True), ("/abs/cache", True), ("memory://c", True),
    ("s3://bucket/cache", True), ("file:///tmp/c", True), ("simplecache::s3://b/c", True),
    ("foo://x", False), ("nocache::s3://b/c", False),
])
def test_cache_location_protocols(location, ok):
    data = {"location": location}
    if ok:
        assert config.CacheConfig.from_dict(data).location == location
    else:
        with pytest.raises(ConfigError, match="unknown storage protocol"):
            config.CacheConfig.from_dict(data)


def test_shard_sizes_accept_units():
    shard = config.ShardLimits.from_dict({"max_bytes": "16MiB", "max_tokens": None})
    assert shard.max_bytes == 16 * 2**20
    with pytest.raises(ConfigError, match="max_tokens or max_bytes"):
        config.ShardLimits.from_dict({"max_bytes": None, "max_tokens": None})


def test_strict_types_reject_quoted_numbers_and_numbers_as_bools():
    with pytest.raises(ConfigError) as info:
        config.CacheConfig.from_dict({"location": "m", "batch_size": "8",
                                      "features": {"answer_hidden": 1}})
    assert set(dict(info.value.problems)) == {"batch_size", "features.answer_hidden"}


def test_from_dict_paths_are_relative_and_source_is_a_dict():
    with pytest.raises(ConfigError) as info:
        config.Pipeline.from_dict({"name": "p", **minimal_pipeline(stages=[{"name": "x"}])})
    assert info.value.source == "<dict>"
    assert list(dict(info.value.problems)) == ["stages[0].name"]


def test_models_are_frozen():
    stage = config.FinetuneStage.from_dict({"name": "finetune", "steps": 1})
    with pytest.raises(Exception, match="frozen"):
        stage.steps = 2


@pytest.mark.parametrize("model, data", [
    (config.TinySpec, {"kind": "qwen2_vl", "hidden_size": 64, "path": "/tmp/t"}),
    (config.DataConfig, {"sources": [{"path": "a.json", "format": "llava", "limit": 3}]}),
    (config.CacheConfig, {"location": "s3://b/c", "generate_answers": {"top_p": 0.9},
                          "features": {"logit_stats": {"top_k": 8}}}),
    (config.GraceStage, {"name": "grace", "epochs": 1}),
    (config.EvaluationConfig, {"metrics": ["answer_nll"]}),
    (config.RecalibratorConfig, {"init": "random", "blocks": 1}),
])
def test_round_trip_of_each_model(model, data):
    built = model.from_dict(copy.deepcopy(data))
    assert model.from_dict(built.to_dict()) == built
    assert yaml.safe_load(yaml.safe_dump(built.to_dict())) == built.to_dict()


def test_pipeline_paths_and_lookups():
    pipeline = config.Pipeline.from_dict({"name": "p", **minimal_pipeline()})
    assert pipeline.output_dir == "runs/p"
    assert pipeline.stage_dir("distill") == "runs/p/distill"
    assert pipeline.summary().endswith("| align -> distill -> finetune")
    with pytest.raises(KeyError, match="no stage 'grace'"):
        pipeline.stage("grace")
    custom = config.Pipeline.from_dict({"name": "p", "output": "/out", **minimal_pipeline(
        student={"source": "/models/s", "family": "llava"})})
    assert custom.stage_dir("align") == "/out/align"
    assert custom.model_location("student") == "/models/s"


def test_vllm_context_shorter_than_the_cache_length_is_refused(tmp_path):
    pipe = minimal_pipeline(teacher_engine={"backend": "vllm", "max_model_len": 128},
                            cache={"location": "memory://cache", "max_length": 256})
    found = problems(write(tmp_path, {"p": pipe}))
    assert "cache.max_length" in found["pipelines.p.teacher_engine.max_model_len"]
