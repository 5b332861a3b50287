"""vLLM rollout backend (GPU; ``pip install posttrain[vllm]``): colocated in-process engine or a ``vllm serve`` server.

* ``mode="colocate"`` (default): an in-process ``vllm.LLM`` shares the training GPU
  (``gpu_memory_utilization``), samples with ``logprobs_mode="processed_logprobs"`` so the returned
  log-probs are those of the distribution actually sampled from (after temperature / top-k / top-p),
  and receives new weights in place through ``load_weights`` (PEFT adapters merged, pushed, unmerged),
  then resets the prefix cache. With ``enable_sleep_mode`` the engine sleeps between generations;
  weights are always woken up before they are written, and re-pushed before generating when sleep
  level 2 discarded them (so training never silently samples from stale weights).
* ``mode="server"``: talks to a running ``vllm serve MODEL --logprobs-mode processed_logprobs``
  over HTTP (``/v1/completions`` with prompt token ids). Pushing weights to a separate server needs
  vLLM's native NCCL weight-transfer API and a communicator spanning trainer and server; that is not
  implemented yet, so ``update_weights`` raises a clear error instead of training on stale weights.

vLLM is imported lazily: importing this module never needs vLLM or CUDA.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from typing import Any, Iterator

from posttrain._rollout import RolloutBatch, SamplingParams, _validate_prompts

__all__ = ["VLLMBackend", "VLLMUnavailableError"]

_UNAVAILABLE = "the vllm rollout backend needs a CUDA GPU and `pip install posttrain[vllm]`; use backend='transformers' on CPU"


class VLLMUnavailableError(RuntimeError):
    """vLLM or CUDA is missing for the colocated vLLM backend."""


def _require_vllm() -> Any:
    """Import vllm after checking CUDA, or raise :class:`VLLMUnavailableError`."""
    import torch

    if not torch.cuda.is_available():
        raise VLLMUnavailableError(f"{_UNAVAILABLE} (torch.cuda.is_available() is False).")
    try:
        import vllm
    except ImportError as exc:
        raise VLLMUnavailableError(f"{_UNAVAILABLE} (import vllm failed: {exc}).") from exc
    return vllm


def _strip_at_stop(ids: list[int], lps: list[float], stop_ids: set[int]) -> tuple[list[int], list[float], bool]:
    """Cut ``ids``/``lps`` after the first stop token; return ``(ids, lps, stopped)``."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1], lps[: i + 1], True
    return ids, lps, False


def _peft_to_vllm_name(name: str, adapter_prefix: str) -> str | None:
    """Map a PEFT parameter name to the base model's name (None for adapter-only tensors)."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    if adapter_prefix in name or "original_module" in name:
        return None
    return name.replace("modules_to_save.default.", "")


class VLLMBackend:
    """Rollout backend on vLLM (see the module docstring for the two modes).

    Args:
        model: The policy (used for its weights and, in colocate mode, its ``name_or_path``).
        tokenizer: Its tokenizer (pad/EOS ids for the default stop tokens).
        mode: ``"colocate"`` (in-process ``vllm.LLM``) or ``"server"`` (HTTP to ``vllm serve``).
        model_name_or_path: Checkpoint vLLM loads (default: ``model.name_or_path``).
        gpu_memory_utilization: Fraction of GPU memory vLLM may take in colocate mode.
        enable_sleep_mode: Let vLLM release memory between generations (colocate).
        sleep_level: 1 (offload weights to CPU) or 2 (discard them; re-pushed before generating).
        max_model_len: Maximum prompt + completion length for vLLM.
        seed: Engine seed (per-request seeds come from ``SamplingParams.seed``).
        tensor_parallel_size: vLLM tensor parallelism (colocate).
        dtype: vLLM weight dtype (``"auto"``: the checkpoint's).
        accelerator: An ``accelerate.Accelerator`` (to unwrap DDP before pushing weights).
        server_url: Base URL of ``vllm serve`` (server mode).
        served_model_name: Model name on the server (default: the first one ``/v1/models`` lists).
        request_timeout: Seconds to wait for one HTTP request (server mode).
        llm_kwargs: Extra keyword arguments for ``vllm.LLM``.

    Raises:
        VLLMUnavailableError: Colocate mode without vLLM or CUDA.
        ValueError: Bad ``mode`` / ``sleep_level``, or no checkpoint path for vLLM to load.
    """

    name = "vllm"
    samples_from_policy = False  # a separate engine: sampling log-probs come from vLLM's kernels and weight copy

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        mode: str = "colocate",
        model_name_or_path: str | None = None,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        sleep_level: int = 2,
        max_model_len: int | None = None,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        accelerator: Any = None,
        server_url: str = "http://localhost:8000",
        served_model_name: str | None = None,
        request_timeout: float = 600.0,
        llm_kwargs: dict | None = None,
    ):
        if mode not in ("colocate", "server"):
            raise ValueError(f"VLLMBackend: mode must be 'colocate' or 'server', got {mode!r}.")
        if sleep_level not in (1, 2):
            raise ValueError(f"VLLMBackend: sleep_level must be 1 or 2, got {sleep_level!r}.")
        self.mode = mode
        self.model = model
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.policy_version = 0
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self._weights_asleep = False
        self._kv_asleep = False
        self._weights_discarded = False
        self.llm = None
        if mode == "server":
            self.server_url = server_url.rstrip("/")
            self.request_timeout = request_timeout
            self.served_model_name = served_model_name
            return

        vllm = _require_vllm()
        path = model_name_or_path or getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not path:
            raise ValueError(
                "VLLMBackend: vLLM must load the model from a checkpoint but none is known; pass model_name_or_path= "
                "(a Hub id or a directory written with save_pretrained)."
            )
        if tensor_parallel_size > 1 or (accelerator is not None and getattr(accelerator, "num_processes", 1) > 1):
            # one engine per training rank, launched by the trainer's own launcher (as TRL does)
            os.environ.setdefault("RANK", str(getattr(accelerator, "process_index", 0)))
            os.environ.setdefault("LOCAL_RANK", str(getattr(accelerator, "local_process_index", 0)))
            os.environ.setdefault("WORLD_SIZE", str(getattr(accelerator, "num_processes", 1)))
        else:
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        kwargs = dict(
            model=path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode,
            distributed_executor_backend="external_launcher",  # in-process worker: weights load in place
            seed=seed,
            dtype=dtype,
            max_num_batched_tokens=4096,
            logprobs_mode="processed_logprobs",  # log-probs of the distribution actually sampled from
        )
        kwargs.update(llm_kwargs or {})
        self._vllm = vllm
        self.llm = vllm.LLM(**kwargs)
        if enable_sleep_mode:
            self._sleep()

    # -- shared helpers --------------------------------------------------------------------------
    def _stop_ids(self, sampling: SamplingParams) -> list[int]:
        if sampling.stop_token_ids:
            return list(sampling.stop_token_ids)
        ids: list[int] = []
        for attr in ("eos_token_id", "pad_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if value is not None and int(value) not in ids:
                ids.append(int(value))
        return ids

    def _unwrapped(self, model: Any) -> Any:
        if self.accelerator is not None:
            return self.accelerator.unwrap_model(model)
        return getattr(model, "module", model)

    # -- colocate --------------------------------------------------------------------------------
    def _sleep(self) -> None:
        self.llm.sleep(level=self.sleep_level)
        self._weights_asleep = self._kv_asleep = True
        self._weights_discarded = self.sleep_level == 2

    def _wake_weights(self) -> None:
        if self._weights_asleep:
            import torch

            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
            self._weights_asleep = False

    def _iter_weights(self, model: Any) -> Iterator[tuple[str, Any]]:
        """Yield ``(vllm_name, tensor)`` for every parameter; PEFT adapters are merged for the duration."""
        model = self._unwrapped(model)
        is_peft = hasattr(model, "merge_adapter") and hasattr(model, "peft_config")
        if not is_peft:
            for name, param in model.named_parameters():
                yield name.replace("_checkpoint_wrapped_module.", ""), param.data
            return
        model.merge_adapter()
        try:
            prefix = getattr(model, "prefix", "lora_")
            for name, param in model.named_parameters():
                vllm_name = _peft_to_vllm_name(name.replace("_checkpoint_wrapped_module.", ""), prefix)
                if vllm_name is not None:
                    yield vllm_name, param.data
        finally:
            model.unmerge_adapter()

    def _load_weights(self, model: Any) -> None:
        self._wake_weights()  # never write into slept (unmapped or discarded) weight memory
        try:
            target = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            target = None
        if target is not None:
            for name, tensor in self._iter_weights(model):
                target.load_weights([(name, tensor)])
        else:  # multiprocess executor: ship weights to the workers in CPU batches
            batch, size = [], 0
            for name, tensor in self._iter_weights(model):
                batch.append((name, tensor.detach().to("cpu")))
                size += tensor.numel() * tensor.element_size()
                if size > 256 * 2**20:
                    self.llm.collective_rpc(_worker_load_weights, args=(batch,))
                    batch, size = [], 0
            if batch:
                self.llm.collective_rpc(_worker_load_weights, args=(batch,))
        self._weights_discarded = False
        self.llm.reset_prefix_cache()

    def _generate_colocate(self, prompts: list[list[int]], sampling: SamplingParams, stop_ids: list[int]):
        if self._weights_asleep or self._kv_asleep:
            if self._weights_discarded:
                if self.model is None:
                    raise RuntimeError(
                        "VLLMBackend: sleep level 2 discarded vLLM's weights and no model is known to re-push; "
                        "call update_weights(model) before generate, or use sleep_level=1."
                    )
                self._load_weights(self.model)
            self._wake_weights()
            self.llm.wake_up(tags=["kv_cache"])
            self._kv_asleep = False
        params = self._vllm.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0 = off (vLLM >= 0.10)
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            max_tokens=sampling.max_tokens,
            logprobs=0,  # the sampled token's (processed) log-prob only
            seed=sampling.seed,
            stop_token_ids=stop_ids,
            skip_special_tokens=False,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=params, use_tqdm=False)
        rows = []
        for out in outputs:  # same order as prompts
            for completion in out.outputs:
                ids = list(completion.token_ids)
                lps = [float(step[tok].logprob) for tok, step in zip(ids, completion.logprobs or [])]
                rows.append((ids, lps, completion.finish_reason == "length"))
        if self.enable_sleep_mode:
            self._sleep()
        return rows

    # -- server ----------------------------------------------------------------------------------
    def _request(self, path: str, payload: dict | None = None) -> dict:
        url = f"{self.server_url}{path}"
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")[:500]
            raise RuntimeError(f"VLLMBackend: the vLLM server answered HTTP {exc.code} to {url}: {body}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise RuntimeError(
                f"VLLMBackend: cannot reach the vLLM server at {url} ({exc}). Start it with "
                "`vllm serve MODEL --logprobs-mode processed_logprobs` and pass server_url=."
            ) from exc

    def _generate_server(self, prompts: list[list[int]], sampling: SamplingParams, stop_ids: list[int]):
        if self.served_model_name is None:
            models = self._request("/v1/models").get("data") or []
            if not models:
                raise RuntimeError(f"VLLMBackend: the server at {self.server_url} lists no models; pass served_model_name=.")
            self.served_model_name = models[0]["id"]
        payload = {
            "model": self.served_model_name,
            "prompt": prompts,  # token-id lists
            "n": sampling.n,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "min_p": sampling.min_p,
            "repetition_penalty": sampling.repetition_penalty,
            "logprobs": 0,
            "seed": sampling.seed,
            "stop_token_ids": stop_ids,
            "skip_special_tokens": False,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
        }
        choices = sorted(self._request("/v1/completions", payload)["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts) * sampling.n:
            raise RuntimeError(f"VLLMBackend: the server returned {len(choices)} choices for {len(prompts)} prompts x n={sampling.n}.")
        rows = []
        for choice in choices:  # index = prompt_index * n + j: grouped by prompt
            logprobs = choice.get("logprobs") or {}
            ids = choice.get("token_ids")
            if ids is None:  # older servers: tokens come back as "token_id:123"
                ids = [int(t.split(":", 1)[1]) for t in logprobs.get("tokens", [])]
            lps = [float(x) for x in logprobs.get("token_logprobs", [])]
            if len(lps) != len(ids):
                raise RuntimeError(
                    f"VLLMBackend: the server returned {len(ids)} token ids but {len(lps)} log-probs; start it with a vLLM "
                    "that supports return_tokens_as_token_ids and logprobs."
                )
            rows.append((list(ids), lps, choice.get("finish_reason") == "length"))
        return rows

    # -- API -------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> RolloutBatch:
        """Sample ``sampling.n`` completions per prompt with vLLM (grouped by prompt).

        Args:
            prompt_ids: Unpadded prompt token ids, one list per prompt.
            sampling: Sampling parameters.

        Returns:
            A :class:`~posttrain.RolloutBatch` with processed sampling log-probs.

        Raises:
            RuntimeError: The server is unreachable or answered malformed data.
        """
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"generate: sampling must be a posttrain.SamplingParams, got {type(sampling).__name__}.")
        prompts = _validate_prompts(prompt_ids)
        stop_ids = self._stop_ids(sampling)
        rows = self._generate_server(prompts, sampling, stop_ids) if self.mode == "server" else self._generate_colocate(prompts, sampling, stop_ids)
        stop_set = set(stop_ids)
        completion_ids, logprobs, truncated = [], [], []
        for ids, lps, hit_length in rows:
            ids, lps, stopped = _strip_at_stop(ids, lps, stop_set)
            completion_ids.append(ids)
            logprobs.append(lps)
            truncated.append(not stopped and (hit_length or len(ids) >= sampling.max_tokens))
        return RolloutBatch(
            prompt_ids=[list(p) for p in prompts for _ in range(sampling.n)],
            completion_ids=completion_ids,
            logprobs=logprobs,
            truncated=truncated,
            policy_version=self.policy_version,
        )

    def update_weights(self, model: Any) -> None:
        """Push ``model``'s current weights into vLLM, reset its prefix cache and bump ``policy_version``.

        Args:
            model: The policy being trained (DDP/PEFT wrappers handled).

        Raises:
            RuntimeError: In server mode (weight transfer to a separate server is not implemented).
        """
        if self.mode == "server":
            raise RuntimeError(
                "VLLMBackend(mode='server').update_weights: pushing weights to a separate `vllm serve` process needs "
                "vLLM's native NCCL weight-transfer API (vLLM >= 0.22, server started with VLLM_SERVER_DEV_MODE=1 and "
                "--weight-transfer-config '{\"backend\":\"nccl\"}') plus a communicator spanning trainer and server, "
                "which posttrain does not implement yet. Use mode='colocate' for on-policy training; server mode only "
                "serves a fixed policy (e.g. evaluation or a frozen teacher)."
            )
        self.model = model
        self._load_weights(model)
        self.policy_version += 1


def _worker_load_weights(worker: Any, weights: list) -> None:
    """Run on a vLLM worker (``collective_rpc``): load ``[(name, cpu_tensor)]`` into its model."""
    device = next(worker.model_runner.model.parameters()).device
    worker.model_runner.model.load_weights([(n, t.to(device)) for n, t in weights])
