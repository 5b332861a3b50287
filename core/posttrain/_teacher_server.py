"""A teacher server: a frozen causal LM's per-token log-probs over HTTP, as vLLM's OpenAI-compatible server gives them.

Distillation with a teacher that never sits in training memory (``server_distill``, ``distill``'s
served-teacher option) asks a server for the teacher's log-probs of each completion token. On a GPU
that server is vLLM (``vllm serve TEACHER --logprobs-mode processed_logprobs``); on a CPU, in tests,
or for a model vLLM does not run, :class:`TeacherServer` serves the same answer with transformers:

* ``POST /v1/completions`` with ``prompt`` (a list of token-id lists, one token-id list, a string or a
  list of strings when a tokenizer is given), ``prompt_logprobs`` = k, ``temperature`` and
  ``max_tokens`` (0 or 1: this server scores, it does not generate). Each choice's
  ``prompt_logprobs`` has one entry per prompt token: ``None`` at position 0, then
  ``{str(token_id): {"logprob", "rank", "decoded_token"}}`` with the k most likely tokens (ranks
  1..k) plus the actual token with its rank, exactly as vLLM returns them. Log-probs are those of
  ``softmax(logits / temperature)`` (vLLM's ``processed_logprobs``; temperature 0 means 1, greedy).
* ``GET /health`` (200) and ``GET /v1/models`` (the served model's id).

So TRL's ``VLLMClient.get_sequence_logprobs``, a real vLLM server and this one are interchangeable.
The forward runs under ``torch.no_grad`` in the model's dtype (``dtype`` casts it), sequences batched
up to ``max_batch_tokens`` padded tokens, and the top-k of one chunk of ``chunk_size`` rows of
logits at a time (never the ``(B, T, V)`` logits). :class:`TeacherServerClient` is the matching
client: padded tensors in TRL's four keys, and one :class:`TeacherServerError` line naming the URL
and what came back for a server that is down, times out, or answers with an error or a wrong shape.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from posttrain._errors import PosttrainError

__all__ = ["TeacherServer", "TeacherServerClient", "TeacherServerError"]


class TeacherServerError(PosttrainError, RuntimeError):
    """A teacher server is unreachable, timed out, or answered with an error or a wrong shape (one line: URL and what came back)."""


def _one_line(text: Any, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


class _RequestError(Exception):
    """A bad request: answered with HTTP 400 and this message."""


# ----------------------------------------------------------------------------- server
class TeacherServer:
    """Serve a frozen causal LM's prompt log-probs over HTTP (the subset of vLLM's OpenAI API that distillation uses).

    Args:
        model: A ``transformers`` causal LM, or a directory / Hub id loaded with
            ``posttrain.load_pretrained(model, role="teacher")``.
        tokenizer: Its tokenizer (optional: needed only for string prompts and ``decoded_token``;
            loaded with a model given by path).
        host: Interface to bind (default loopback only).
        port: Port (0: a free one; read :attr:`url` after :meth:`start`).
        max_batch_tokens: Padded tokens per forward (sequences are batched up to this; a longer one runs alone).
        dtype: Cast the model to this dtype (``torch.float64``, ``"bfloat16"``, ...); default: as loaded.
        chunk_size: Rows of logits per top-k chunk.
        model_name: The id ``/v1/models`` reports (default: the model's ``name_or_path``).

    Use it as a context manager, or :meth:`start` / :meth:`stop`::

        with TeacherServer("outputs/tiny-teacher") as server:
            client = TeacherServerClient(server.url)
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, host: str = "127.0.0.1", port: int = 0, max_batch_tokens: int = 8192,
                 dtype: Any = None, chunk_size: int = 256, model_name: str | None = None):
        import torch

        from posttrain._models import load_pretrained

        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            model_name = model_name or str(model)
            model, loaded_tokenizer = load_pretrained(str(model), role="teacher", tokenizer=tokenizer, load_tokenizer=tokenizer is None)
            tokenizer = tokenizer or loaded_tokenizer
        if dtype is not None:
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1 or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"TeacherServer: max_batch_tokens and chunk_size must be positive integers, got {max_batch_tokens!r}, {chunk_size!r}.")
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model, self.tokenizer = model, tokenizer
        self.host, self.port = host, port
        self.max_batch_tokens, self.chunk_size = max_batch_tokens, chunk_size
        self.model_name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._lock = threading.Lock()  # one forward at a time: memory stays that of one batch
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._httpd is None:
            raise RuntimeError("TeacherServer.url: the server is not running; call start() first.")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "TeacherServer":
        """Bind and serve on a background (daemon) thread; returns self."""
        if self._httpd is not None:
            return self
        server = self

        class Handler(_Handler):
            teacher = server

        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="posttrain-teacher-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on the calling thread until interrupted (the CLI's ``posttrain serve-teacher``)."""
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(0.5)
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> "TeacherServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------------------- scoring
    def _token_lists(self, prompt: Any) -> list[list[int]]:
        """The request's ``prompt`` as token-id lists."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)):
            if self.tokenizer is None:
                raise _RequestError("string prompts need a tokenizer: start the server with one, or send token ids")
            texts = [prompt] if isinstance(prompt, str) else prompt
            return [list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = [prompt]
        if not (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt)):
            raise _RequestError("'prompt' must be a non-empty list of non-empty token-id lists, a token-id list, or strings")
        for i, sequence in enumerate(prompt):
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in sequence):
                raise _RequestError(f"prompt[{i}] holds a value that is not a token id in [0, {self.vocab_size})")
        return prompt

    def score(self, sequences: list[list[int]], top_k: int, temperature: float = 1.0) -> list[list[dict | None]]:
        """Return vLLM's ``prompt_logprobs`` for each sequence (position 0 None), computed under no_grad."""
        import torch

        from posttrain._chunked import _chunk_logits, causal_lm_states

        device = next(self.model.parameters()).device
        pad = 0
        out: list[list[dict | None]] = [[None] * len(s) for s in sequences]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        batches, current = [], []
        for i in order:  # batches of up to max_batch_tokens padded tokens (sorted by length: little padding)
            if current and (len(current) + 1) * len(sequences[i]) > self.max_batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        with self._lock, torch.no_grad():
            for batch in batches:
                length = max(len(sequences[i]) for i in batch)
                ids = torch.full((len(batch), length), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), length), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                    mask[row, : len(sequences[i])] = 1
                _, states = causal_lm_states(self.model, chunk_size=self.chunk_size, input_ids=ids.to(device), attention_mask=mask.to(device))
                # the rows to score: position p >= 1 of each sequence, predicted from the state at p - 1
                rows = [(row, p) for row, i in enumerate(batch) for p in range(1, len(sequences[i]))]
                for start in range(0, len(rows), self.chunk_size):
                    part = rows[start : start + self.chunk_size]
                    r = torch.tensor([row for row, _ in part], device=device)
                    p = torch.tensor([pos for _, pos in part], device=device)
                    if states.weight is not None:
                        dtype = states.compute_dtype or states.weight.dtype
                        z = _chunk_logits(states.tensor[r, p - 1].to(dtype), states.weight.to(dtype),
                                          None if states.bias is None else states.bias.to(dtype), temperature)
                    else:
                        z = states.tensor[r, p - 1]
                        z = (z if z.dtype == torch.float64 else z.float()) / temperature
                    logps = torch.log_softmax(z, dim=-1)  # (n, V): one chunk
                    del z
                    top_values, top_ids = torch.topk(logps, min(top_k, logps.shape[-1]), dim=-1)
                    actual = ids[r.cpu(), p.cpu()].to(device)
                    actual_logp = logps.gather(1, actual[:, None]).squeeze(1)
                    actual_rank = (logps > actual_logp[:, None]).sum(-1) + 1
                    del logps
                    for n, (row, pos) in enumerate(part):
                        entry = {}
                        for rank, (token, value) in enumerate(zip(top_ids[n].tolist(), top_values[n].tolist()), start=1):
                            entry[str(token)] = {"logprob": value, "rank": rank, "decoded_token": self._decode(token)}
                        token = int(actual[n])
                        if str(token) not in entry:
                            entry[str(token)] = {"logprob": float(actual_logp[n]), "rank": int(actual_rank[n]), "decoded_token": self._decode(token)}
                        out[batch[row]][pos] = entry
        return out

    def _decode(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token])

    def completions(self, body: Any) -> dict:
        """The ``/v1/completions`` answer to a request body (raises _RequestError for a bad one)."""
        if not isinstance(body, dict) or "prompt" not in body:
            raise _RequestError("the body must be a JSON object with 'prompt'")
        k = body.get("prompt_logprobs")
        if k is None:
            k = 0
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise _RequestError(f"'prompt_logprobs' must be a non-negative integer, got {k!r}")
        max_tokens = body.get("max_tokens", 1)
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens > 1):
            raise _RequestError(f"this teacher server scores prompts only: 'max_tokens' must be 0 or 1, got {max_tokens!r}")
        temperature = body.get("temperature", 1.0)
        if temperature is None:
            temperature = 1.0
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0 or not math.isfinite(temperature):
            raise _RequestError(f"'temperature' must be a number >= 0, got {temperature!r}")
        temperature = float(temperature) if temperature >= 1e-5 else 1.0  # vLLM: 0 is greedy (logits unscaled)
        sequences = self._token_lists(body["prompt"])
        scored = self.score(sequences, max(k, 0), temperature) if k > 0 else [[None] * len(s) for s in sequences]
        return {
            "id": f"cmpl-posttrain-{time.time_ns():x}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                         "prompt_logprobs": entries} for i, entries in enumerate(scored)],
            "usage": {"prompt_tokens": sum(len(s) for s in sequences), "completion_tokens": 0, "total_tokens": sum(len(s) for s in sequences)},
        }


class _Handler(BaseHTTPRequestHandler):
    teacher: TeacherServer
    # one request per connection: stop() then really ends the service (no keep-alive connection outlives it)
    protocol_version = "HTTP/1.0"

    def log_message(self, format, *args):  # quiet: no line per request on stderr
        pass

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nobody to answer
            self.close_connection = True

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._send(200, {})
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.teacher.model_name, "object": "model", "owned_by": "posttrain",
                                                          "max_model_len": getattr(self.teacher.model.config, "max_position_embeddings", None)}]})
        else:
            self._send(404, {"error": {"message": f"no route GET {path}", "type": "NotFoundError", "code": 404}})

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path != "/v1/completions":
            self._send(404, {"error": {"message": f"no route POST {path}", "type": "NotFoundError", "code": 404}})
            return
        try:
            body = json.loads(raw or b"null")
            answer = self.teacher.completions(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._send(400, {"error": {"message": f"the body is not JSON: {exc}", "type": "BadRequestError", "code": 400}})
        except _RequestError as exc:
            self._send(400, {"error": {"message": str(exc), "type": "BadRequestError", "code": 400}})
        except Exception as exc:  # noqa: BLE001 - the client gets the error instead of a dropped connection
            self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "InternalServerError", "code": 500}})
        else:
            self._send(200, answer)


# ----------------------------------------------------------------------------- client
class TeacherServerClient:
    """Ask a teacher server (:class:`TeacherServer` or vLLM's OpenAI-compatible server) for completion-token log-probs.

    Args:
        base_url: ``http://host:port`` of the server.
        timeout: Seconds to wait for one answer.
        max_retries: Extra tries after a refused / reset connection or an HTTP 502/503 (with a short
            backoff); a timeout is not retried.
    """

    def __init__(self, base_url: str, *, timeout: float = 60.0, max_retries: int = 2):
        if not isinstance(base_url, str) or not base_url.strip():
            raise TeacherServerError(f"TeacherServerClient: base_url must be an http URL such as http://127.0.0.1:8000, got {base_url!r}.")
        base_url = base_url.strip().rstrip("/")
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url, self.timeout, self.max_retries = base_url, float(timeout), int(max_retries)
        self._model: str | None = None

    def _request(self, path: str, payload: Any = None) -> Any:
        url = self.base_url + path
        data = None if payload is None else json.dumps(payload).encode()
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                             headers={"Content-Type": "application/json"} if data is not None else {})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                break
            except urllib.error.HTTPError as exc:
                text = exc.read().decode(errors="replace") if exc.fp is not None else ""
                if exc.code in (502, 503) and attempt < self.max_retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise TeacherServerError(f"teacher server {url} answered HTTP {exc.code}: {_one_line(text)}") from None
            except (TimeoutError, OSError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError) or "timed out" in str(reason):
                    raise TeacherServerError(f"teacher server {url} did not answer within {self.timeout:g} s (timeout); "
                                             "raise the client's timeout or check the server") from None
                if attempt < self.max_retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise TeacherServerError(f"teacher server {url} is unreachable ({_one_line(reason)}); start it "
                                         "(`posttrain serve-teacher MODEL_DIR` or `vllm serve`) or fix the URL") from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TeacherServerError(f"teacher server {url} answered with something that is not JSON: {_one_line(body.decode(errors='replace'))!r}") from None

    def health(self) -> bool:
        """Return True when ``/health`` answers 200 (raises :class:`TeacherServerError` otherwise)."""
        self._request("/health")
        return True

    @property
    def model(self) -> str:
        """The id the server serves (``/v1/models``), asked once."""
        if self._model is None:
            answer = self._request("/v1/models")
            try:
                self._model = str(answer["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise TeacherServerError(f"teacher server {self.base_url}/v1/models answered without data[0].id: {_one_line(json.dumps(answer))}") from None
        return self._model

    def sequence_logprobs(self, sequences: list[list[int]], prompt_lengths: list[int], top_logprobs: int, temperature: float = 1.0) -> dict:
        """Return the teacher's log-probs of the completions (tokens from ``prompt_lengths[i]`` on) as padded tensors.

        Keys (TRL's ``VLLMClient.get_sequence_logprobs``, padded to the longest completion T):
        ``logprobs`` ``(B, T, K)`` float64 top-k log-probs sorted by rank (-inf padding),
        ``logprob_token_ids`` ``(B, T, K)`` long (0 padding), ``actual_logprobs`` ``(B, T, 1)``
        float64 log-prob of each actual token (-inf padding), ``actual_token_ids`` ``(B, T, 1)`` long.

        Raises:
            ValueError: Mismatched ``sequences`` / ``prompt_lengths``, a prompt length outside
                ``[1, len(sequence)]``, ``top_logprobs < 1`` or ``temperature <= 0``.
            TeacherServerError: The server is down, times out, answers an HTTP error, non-JSON, or a
                wrong shape (missing keys, fewer choices or positions than asked, no actual token).
        """
        import torch

        if len(sequences) != len(prompt_lengths) or not sequences:
            raise ValueError(f"sequence_logprobs: {len(sequences)} sequences and {len(prompt_lengths)} prompt lengths; pass one length per sequence.")
        if top_logprobs < 1 or not temperature > 0:
            raise ValueError(f"sequence_logprobs: top_logprobs must be >= 1 and temperature > 0, got {top_logprobs}, {temperature}.")
        for i, (sequence, length) in enumerate(zip(sequences, prompt_lengths)):
            if not 1 <= length <= len(sequence):
                raise ValueError(f"sequence_logprobs: prompt_lengths[{i}]={length} is outside [1, {len(sequence)}] (the first token has no log-prob).")
        sequences = [[int(t) for t in s] for s in sequences]
        payload = {"model": self.model, "prompt": sequences, "max_tokens": 1, "temperature": float(temperature), "prompt_logprobs": int(top_logprobs)}
        url = self.base_url + "/v1/completions"
        answer = self._request("/v1/completions", payload)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != len(sequences):
            got = "no 'choices' list" if not isinstance(choices, list) else f"{len(choices)} choices"
            raise TeacherServerError(f"teacher server {url} answered {got} for {len(sequences)} sequences: {_one_line(json.dumps(answer))}")
        if all(isinstance(c, dict) and "index" in c for c in choices):
            choices = sorted(choices, key=lambda c: c["index"])
        T = max(len(s) - n for s, n in zip(sequences, prompt_lengths))
        B, K = len(sequences), int(top_logprobs)
        logprobs = torch.full((B, T, K), float("-inf"), dtype=torch.float64)
        token_ids = torch.zeros((B, T, K), dtype=torch.long)
        actual_logprobs = torch.full((B, T, 1), float("-inf"), dtype=torch.float64)
        actual_ids = torch.zeros((B, T, 1), dtype=torch.long)
        for i, (choice, sequence, length) in enumerate(zip(choices, sequences, prompt_lengths)):
            positions = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
            if not isinstance(positions, list) or len(positions) < len(sequence):
                got = "no 'prompt_logprobs' list" if not isinstance(positions, list) else f"{len(positions)} prompt_logprobs positions"
                raise TeacherServerError(f"teacher server {url} answered {got} for sequence {i} of {len(sequence)} tokens "
                                         f"(completion from position {length}): {_one_line(json.dumps(choice))}")
            for t, position in enumerate(range(length, len(sequence))):
                entry = positions[position]
                try:
                    items = sorted(entry.items(), key=lambda item: item[1]["rank"])[:K]
                    values = [float(item["logprob"]) for _, item in items]
                    ids = [int(token) for token, _ in items]
                    actual = entry[str(sequence[position])]["logprob"]
                except (AttributeError, KeyError, TypeError, ValueError):
                    raise TeacherServerError(f"teacher server {url} answered position {position} of sequence {i} without "
                                             f"{{token_id: {{logprob, rank}}}} for the actual token {sequence[position]}: {_one_line(json.dumps(entry))}") from None
                values = [-math.inf if math.isnan(v) else v for v in values]
                logprobs[i, t, : len(values)] = torch.tensor(values, dtype=torch.float64)
                token_ids[i, t, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                actual_logprobs[i, t, 0] = -math.inf if actual is None or math.isnan(float(actual)) else float(actual)
                actual_ids[i, t, 0] = sequence[position]
        return {"logprobs": logprobs, "logprob_token_ids": token_ids, "actual_logprobs": actual_logprobs, "actual_token_ids": actual_ids}
