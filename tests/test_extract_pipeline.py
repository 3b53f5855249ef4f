"""The teacher pass end to end, in process, on tiny Qwen2-VL and LLaVA teachers.

Every cached feature is checked against a direct forward of the teacher in float32 (states
taken with hooks on the final norm and on block L-2, not from ``hidden_states``) and float64
maths: spans exactly, hidden states against the bf16-rounded (or codec-rounded) reference,
logit statistics against full-vocabulary float64 log-softmax, Grams against a direct Gram.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from extract_support import cache_content, make_pipeline, pipeline_dict, write_pipelines
from genrecal.cli import app
from genrecal.extract.errors import CacheExistsError, ExtractSetupError, SampleError
from genrecal.extract.fidelity import check_against_teacher
from genrecal.extract.inputs import ensure_synthetic, read_inputs
from genrecal.extract.job import job_from_pipeline
from genrecal.extract.pipeline import batch_sample_features, check_output, run_extract
from genrecal.extract.teacher import load_teacher
from genrecal.store.artifacts import load_teacher_config, load_teacher_embeddings, load_teacher_head, load_tokenizer_files
from genrecal.store.codecs import decode_feature, encode_feature
from genrecal.store.errors import DatasetError
from genrecal.store.fingerprint import teacher_fingerprint
from genrecal.store.reader import CacheReader
from genrecal.store.schema import answer_target_positions, answer_window_positions, question_positions
from genrecal.model.encoding import encode_sample
from genrecal.model.loading import load_vlm

FAMILIES = {"qwen2_vl": {"question_hidden": "fp8_e4m3"}, "llava_qwen2": {"question_hidden": "int8"}}
BF16_ULP = 2.0 ** -7  # relative spacing of bfloat16 numbers (8 significant bits)


def _extract(pipe, **overrides):
    job = job_from_pipeline(pipe, **overrides)
    return run_extract(job.with_overrides(progress=False))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def extracted(request, tiny_vlm_dir, tmp_path_factory):
    """(kind, pipeline, cache url) of a batch-size-1 extraction of 8 synthetic samples."""
    kind = request.param
    out = tmp_path_factory.mktemp(f"extract-{kind}")
    pipe = make_pipeline("t", pipeline_dict(tiny_vlm_dir(kind), kind, out, codecs=FAMILIES[kind]))
    result = _extract(pipe)
    assert result.written == 8 and result.manifest.counts.samples == 8
    return kind, pipe, result.out


@pytest.fixture(scope="module")
def reference_vlm(tiny_vlm_dir):
    loaded = {}

    def get(kind):
        if kind not in loaded:
            loaded[kind] = load_vlm(tiny_vlm_dir(kind), dtype="float32")
        return loaded[kind]
    return get


def _reference_states(vlm, encoded):
    """float64 [N, d] final-norm output and block L-2 output of one direct forward."""
    captured = {}
    norm = vlm.family.final_norm(vlm.model)
    block = vlm.family.decoder_layers(vlm.model)[-2]
    hooks = [norm.register_forward_hook(lambda m, a, o: captured.update(final=o)),
             block.register_forward_hook(
                 lambda m, a, o: captured.update(pen=o[0] if isinstance(o, tuple) else o))]
    try:
        with torch.no_grad():
            vlm.model(**encoded.inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return captured["final"][0].double(), captured["pen"][0].double()


def _through_codec(spec, value):
    return decode_feature(spec, encode_feature(spec, value), torch.float32)


# ----------------------------------------------------------------------------- features


def test_every_feature_matches_a_direct_forward(extracted, reference_vlm):
    kind, pipe, url = extracted
    vlm = reference_vlm(kind)
    reader = CacheReader(url)
    samples = {s.id: s for s in read_inputs(job_from_pipeline(pipe).settings).samples}
    assert sorted(reader.sample_ids()) == sorted(samples)
    for sample_id, sample in samples.items():
        cached = reader.get(sample_id)
        encoded = encode_sample(vlm, sample, max_length=pipe.cache.max_length)
        _check_spans(vlm, sample, cached)
        assert cached.input_ids.tolist() == encoded.input_ids and cached.spans == encoded.spans
        assert cached.content_hash == sample.content_hash and cached.status == "ok"
        z, pen = _reference_states(vlm, encoded)
        _check_hidden(reader, cached, z)
        _check_grams(cached, pen)
        _check_logit_stats(vlm, reader.features["logit_stats"], cached, z)


def _check_spans(vlm, sample, cached):
    """Spans checked from the tokens themselves: answer text, end-of-turn, image runs."""
    ids = cached.input_ids.tolist()
    eot_ids = {vlm.tokenizer.convert_tokens_to_ids(t) for t in vlm.family.end_of_turn}
    for (start, end), answer in zip(cached.spans.answers, sample.answers):
        assert ids[end - 1] in eot_ids
        assert vlm.tokenizer.decode(ids[start:end - 1]).strip() == answer.strip()
    image_id = vlm.family.image_token_ids(vlm.model.config)[0]
    in_spans = {p for s, e in cached.spans.images for p in range(s, e)}
    assert in_spans == {p for p, t in enumerate(ids) if t == image_id}
    assert len(cached.spans.images) == len(sample.images)


def _check_hidden(reader, cached, z):
    window = answer_window_positions(cached.spans)
    expected = z[window].float().bfloat16().float()  # bf16 codec: exact after rounding
    assert torch.equal(cached.answer_hidden, expected)
    spec = reader.features["question_hidden"]
    positions = question_positions(cached.spans, spec.select)
    assert cached.question_positions.tolist() == positions
    assert torch.equal(cached.question_hidden, _through_codec(spec, z[positions].float()))
    scale = z[positions].abs().amax(dim=1, keepdim=True)
    bound = scale / 127 if spec.codec == "int8" else z[positions].abs() / 16 + scale / 448 / 512
    assert ((cached.question_hidden.double() - z[positions]).abs() <= bound + 1e-7).all()


def _check_grams(cached, pen):
    assert len(cached.visual_gram) == len(cached.spans.images)
    for gram, (start, end) in zip(cached.visual_gram, cached.spans.images):
        v = pen[start:end] / pen[start:end].norm(dim=1, keepdim=True)
        torch.testing.assert_close(gram.double(), v @ v.T, rtol=0, atol=2.0 ** -8)


def _check_logit_stats(vlm, spec, cached, z):
    head = vlm.family.lm_head(vlm.model)
    positions = answer_target_positions(cached.spans)
    raw = z[positions] @ head.weight.double().T
    logits = vlm.family.logit_transform(vlm.model).apply(raw)
    targets = cached.input_ids[[p + 1 for p in positions]]
    logp = F.log_softmax(logits, dim=-1)
    stats = cached.logit_stats
    close = dict(rtol=0, atol=1e-4)
    torch.testing.assert_close(stats.target_logit.double(), logits.gather(1, targets[:, None])[:, 0], **close)
    torch.testing.assert_close(stats.lse.double(), logits.logsumexp(-1), **close)
    torch.testing.assert_close(stats.lse_t.double(), (logits / spec.temperature).logsumexp(-1), **close)
    torch.testing.assert_close(stats.entropy.double(), -(logp.exp() * logp).sum(-1), **close)
    top = logp.topk(spec.width, dim=-1)
    assert torch.equal(stats.topk_ids.sort(dim=1).values, top.indices.sort(dim=1).values)
    torch.testing.assert_close(stats.topk_logprobs.double(), top.values, rtol=BF16_ULP, atol=1e-6)


# ----------------------------------------------------------------------------- batching


def test_batched_features_equal_batch_size_one(extracted):
    kind, pipe, _ = extracted
    teacher = load_teacher(job_from_pipeline(pipe).settings.teacher, device="cpu")
    samples = read_inputs(job_from_pipeline(pipe).settings).samples
    items = [(s, encode_sample(teacher.vlm, s)) for s in samples]
    assert len({len(e.input_ids) for _, e in items}) > 1, "the batch must need padding"
    specs = CacheReader(extracted[2]).features
    batched = batch_sample_features(teacher, specs, items)
    for (sample, enc), got in zip(items, batched):
        single = batch_sample_features(teacher, specs, [(sample, enc)])[0]
        assert got.input_ids == single.input_ids and got.spans == single.spans
        for name in ("answer_hidden", "question_hidden"):
            torch.testing.assert_close(got.values[name], single.values[name], rtol=1e-5, atol=1e-5)
        for a, b in zip(got.values["visual_gram"], single.values["visual_gram"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        a, b = got.values["logit_stats"], single.values["logit_stats"]
        assert torch.equal(a.topk_ids.sort(1).values, b.topk_ids.sort(1).values)
        for field in ("topk_logprobs", "target_logit", "lse", "lse_t", "entropy"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-5)


def test_batched_cache_matches_batch_size_one_cache(extracted, tmp_path):
    kind, pipe, url = extracted
    batched = _extract(pipe, out=str(tmp_path / "b3"), batch_size=3)
    ref, got = cache_content(url), cache_content(batched.out)
    assert sorted(ref["samples"]) == sorted(got["samples"])
    for sample_id, r in ref["samples"].items():
        g = got["samples"][sample_id]
        assert g["input_ids"] == r["input_ids"] and g["spans"] == r["spans"]
        torch.testing.assert_close(g["answer_hidden"], r["answer_hidden"], rtol=BF16_ULP, atol=1e-6)
        torch.testing.assert_close(g["logit_stats"].lse, r["logit_stats"].lse, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- artifacts


def test_teacher_artifacts_and_fingerprint(extracted, reference_vlm, tmp_path):
    kind, pipe, url = extracted
    vlm = reference_vlm(kind)
    reader = CacheReader(url)
    head = load_teacher_head(url)
    assert torch.equal(head.weight, vlm.family.lm_head(vlm.model).weight)
    assert head.transform == vlm.family.logit_transform(vlm.model)
    answer_ids = sorted({t for s in reader for a, b in s.spans.answers for t in s.input_ids[a:b].tolist()})
    embeddings = load_teacher_embeddings(url)
    assert embeddings.ids.tolist() == answer_ids
    assert torch.equal(embeddings.rows, vlm.model.get_input_embeddings().weight[answer_ids])
    assert load_teacher_config(url)["model_type"] == vlm.model.config.model_type
    files = load_tokenizer_files(url)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    from transformers import AutoTokenizer

    rebuilt = AutoTokenizer.from_pretrained(tmp_path)
    assert rebuilt("What colour is it?")["input_ids"] == vlm.tokenizer("What colour is it?")["input_ids"]
    weights = reader.manifest.teacher.weights
    assert reader.manifest.teacher == teacher_fingerprint(vlm.model.config.to_dict(), weights, files)


# ----------------------------------------------------------------------------- resume / policies


def test_existing_cache_needs_resume_and_resume_does_only_missing_work(tiny_vlm_dir, tmp_path):
    pipe = make_pipeline("t", pipeline_dict(tiny_vlm_dir("qwen2_vl"), "qwen2_vl", tmp_path))
    first = _extract(pipe, limit=3)
    assert (first.written, first.manifest.counts.samples) == (3, 3)
    with pytest.raises(CacheExistsError, match="--resume.*--out"):
        _extract(pipe, limit=3)
    again = _extract(pipe, limit=3, resume=True)
    assert (again.written, again.already) == (0, 3)
    more = _extract(pipe, limit=5, resume=True)
    assert (more.written, more.already, more.manifest.counts.samples) == (2, 3, 5)
    assert more.manifest.header.settings["backend"] == "hf"


def test_a_cache_is_not_resumed_with_another_backend(tiny_vlm_dir, tmp_path):
    """The manifest records the engine that ran the forward; resuming with the other one is
    refused by check_output, before any model or engine loads, naming the fix."""
    pipe = make_pipeline("t", pipeline_dict(tiny_vlm_dir("qwen2_vl"), "qwen2_vl", tmp_path))
    _extract(pipe, limit=2)
    vllm_job = job_from_pipeline(pipe, resume=True, backend="vllm")
    assert vllm_job.settings.backend == vllm_job.engine.backend == "vllm"
    with pytest.raises(ExtractSetupError, match=r"extracted with --backend hf, this run uses "
                                                r"--backend vllm.*resume with --backend hf"):
        check_output(vllm_job)
    check_output(job_from_pipeline(pipe, resume=True))  # the same backend resumes


def test_a_cache_begun_before_the_backend_was_recorded_still_resumes(tiny_vlm_dir, tmp_path):
    """Rank logs without settings.backend (an older genrecal; transformers wrote them) resume
    with the hf backend under their own record, and are refused to vLLM."""
    pipe = make_pipeline("t", pipeline_dict(tiny_vlm_dir("qwen2_vl"), "qwen2_vl", tmp_path))
    first = _extract(pipe, limit=2)
    for log in Path(first.out, "ranks").glob("rank-*.json"):
        data = json.loads(log.read_text())
        del data["header"]["settings"]["backend"]
        log.write_text(json.dumps(data))
    with pytest.raises(ExtractSetupError, match="extracted with --backend hf"):
        check_output(job_from_pipeline(pipe, resume=True, backend="vllm"))
    more = _extract(pipe, limit=4, resume=True)
    assert (more.written, more.already, more.manifest.counts.samples) == (2, 2, 4)
    assert "backend" not in more.manifest.header.settings  # the cache keeps its own record


def _write_bad_dataset(root: Path) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(root / "red.png")
    human = lambda text: {"from": "human", "value": f"<image>\n{text}"}  # noqa: E731
    rows = [
        {"id": "good-0", "image": "red.png", "conversations": [human("Colour?"), {"from": "gpt", "value": "red"}]},
        {"id": "missing-image", "image": "nope.png", "conversations": [human("Colour?"), {"from": "gpt", "value": "red"}]},
        {"id": "control-token", "image": "red.png", "conversations": [human("Colour?"), {"from": "gpt", "value": "red<|im_end|>"}]},
        {"id": "too-long", "image": "red.png", "conversations": [human("word " * 80), {"from": "gpt", "value": "red"}]},
        {"id": "truncated", "image": "red.png", "conversations": [
            human("Colour?"), {"from": "gpt", "value": "red"},
            {"from": "human", "value": "and " * 40}, {"from": "gpt", "value": "blue"}]},
        {"id": "good-1", "image": "red.png", "conversations": [human("Shape?"), {"from": "gpt", "value": "square"}]},
    ]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bad_data_pipeline(tiny_vlm_dir, tmp_path, *, on_error: str, read_on_error: str = "skip"):
    data = {"sources": [{"path": str(_write_bad_dataset(tmp_path / "data")), "format": "llava"}],
            "on_error": read_on_error}
    return make_pipeline("bad", pipeline_dict(tiny_vlm_dir("qwen2_vl"), "qwen2_vl", tmp_path,
                                              data=data, max_length=64, on_error=on_error))


def test_on_error_skip_records_every_bad_sample_with_its_reason(tiny_vlm_dir, tmp_path):
    result = _extract(_bad_data_pipeline(tiny_vlm_dir, tmp_path, on_error="skip"))
    content = cache_content(result.out)
    assert sorted(content["samples"]) == ["good-0", "good-1", "truncated"]
    assert content["samples"]["truncated"]["status"] == "truncated"
    assert len(content["samples"]["truncated"]["spans"].answers) == 1
    reasons = dict(content["skipped"])
    assert sorted(reasons) == ["control-token", "missing-image", "too-long"]
    assert reasons["missing-image"].startswith("dataset:") and "nope.png" in reasons["missing-image"]
    assert "control token" in reasons["control-token"]
    assert "max_length" in reasons["too-long"]
    assert all(s.file.endswith("train.jsonl") for s in CacheReader(result.out).manifest.skipped)


def test_on_error_raise_names_the_sample_and_its_file(tiny_vlm_dir, tmp_path):
    with pytest.raises(SampleError, match=r"'control-token'.*train\.jsonl") as info:
        _extract(_bad_data_pipeline(tiny_vlm_dir, tmp_path, on_error="raise"))
    assert info.value.sample_id == "control-token"
    with pytest.raises(DatasetError, match=r"missing-image.*train\.jsonl"):
        _extract(_bad_data_pipeline(tiny_vlm_dir, tmp_path / "r", on_error="raise",
                                    read_on_error="raise"))


# ----------------------------------------------------------------------------- fidelity, CLI


def test_fidelity_from_the_cache_alone(extracted, tmp_path):
    kind, pipe, url = extracted
    report = check_against_teacher(url, 3, seed=1)
    assert report.ok and len(report.samples) == 3
    assert {f for f, _ in report.deviations} == {"answer_hidden", "question_hidden",
                                                  "visual_gram", "logit_stats"}
    assert all(d.max_abs == 0.0 for d in report.deviations.values())  # same bs-1 computation
    assert "max abs dev" in report.format()


def test_fidelity_reports_changed_data_and_refuses_another_teacher(tiny_vlm_dir, tmp_path):
    from genrecal.extract.errors import FidelityError

    pipe = make_pipeline("t", pipeline_dict(tiny_vlm_dir("qwen2_vl"), "qwen2_vl", tmp_path))
    url = _extract(pipe, limit=2).out
    train = tmp_path / "data" / "synthetic" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows[0]["conversations"][1]["value"] = "purple"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check_against_teacher(url, 2)
    assert not report.ok and "train-000000" in report.mismatches[0]
    other = make_pipeline("o", pipeline_dict(tiny_vlm_dir("llava_qwen2"), "llava_qwen2", tmp_path))
    with pytest.raises(FidelityError, match="not the one"):
        check_against_teacher(url, 1, settings=job_from_pipeline(other).settings)


def test_cli_extract_and_validate_against_teacher(tiny_vlm_dir, tmp_path):
    pipes = write_pipelines(tmp_path / "pipelines.yaml", {
        "t": pipeline_dict(tiny_vlm_dir("llava_qwen2"), "llava_qwen2", tmp_path)})
    runner = CliRunner()
    ok = runner.invoke(app, ["extract", "t", "--file", str(pipes), "--limit", "2"])
    assert ok.exit_code == 0, ok.output
    assert "extracted 2 samples" in ok.output
    again = runner.invoke(app, ["extract", "t", "--file", str(pipes), "--limit", "2"])
    assert again.exit_code == 2 and "--resume" in again.output
    cache = str(tmp_path / "cache")
    checked = runner.invoke(app, ["validate", cache, "--against-teacher", "1"])
    assert checked.exit_code == 0, checked.output
    assert "logit_stats" in checked.output and "max abs dev" in checked.output


def test_non_finite_teacher_values_skip_only_the_bad_samples(tiny_vlm_dir, reference_vlm,
                                                             tmp_path, monkeypatch):
    import genrecal.extract.pipeline as pipeline
    from genrecal.store.errors import FeatureInputError

    pipe = make_pipeline("t", pipeline_dict(tiny_vlm_dir("qwen2_vl"), "qwen2_vl", tmp_path,
                                            batch_size=3, on_error="skip"))
    ensure_synthetic(job_from_pipeline(pipe))
    samples = read_inputs(job_from_pipeline(pipe).settings).samples
    ids = {s.id: encode_sample(reference_vlm("qwen2_vl"), s).input_ids for s in samples}
    # the faults are injected by input ids: pick samples whose ids no other sample shares
    unique = [s.id for s in samples if sum(v == ids[s.id] for v in ids.values()) == 1]
    bad_stats, bad_hidden = unique[1], unique[-1]
    real = pipeline.batch_features

    def faulty(teacher, encoded, states, specs):
        values = real(teacher, encoded, states, specs)
        if any(e.input_ids == ids[bad_stats] for e in encoded):
            raise FeatureInputError("logit_statistics: non-finite logits at answer rows [0]")
        for enc, value in zip(encoded, values):
            if enc.input_ids == ids[bad_hidden]:
                value["answer_hidden"][0, 0] = float("nan")
        return values

    monkeypatch.setattr(pipeline, "batch_features", faulty)
    content = cache_content(_extract(pipe).out)
    assert sorted(content["samples"]) == sorted(set(ids) - {bad_stats, bad_hidden})
    reasons = dict(content["skipped"])
    assert "non-finite teacher values" in reasons[bad_stats]
    assert "invalid teacher features" in reasons[bad_hidden] and "NaN" in reasons[bad_hidden]
    raising = make_pipeline("r", pipeline_dict(tiny_vlm_dir("qwen2_vl"), "qwen2_vl",
                                               tmp_path / "r", batch_size=3))
    # under on_error raise the job stops at whichever bad sample its batches reach first (the
    # batch order depends on the token lengths), naming it
    from genrecal.extract.errors import WriterError

    with pytest.raises((SampleError, WriterError)) as info:
        _extract(raising)
    assert repr(bad_stats) in str(info.value) or repr(bad_hidden) in str(info.value)
