"""Tests for the vLLM rollout backend: clear errors on CPU, server-mode HTTP parsing, GPU runs when available."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from posttrain._rollout import RolloutEngine, SamplingParams


def _has_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_vllm() and torch.cuda.is_available(), reason="vLLM and CUDA are available")
def test_clear_error_without_vllm_or_cuda():
    from posttrain._rollout_vllm import VLLMBackend, VLLMUnavailableError

    with pytest.raises(VLLMUnavailableError, match=r"needs a CUDA GPU and `pip install posttrain\[vllm\]`; use backend='transformers' on CPU"):
        VLLMBackend(model_name_or_path="some/model")
    with pytest.raises(RuntimeError, match="use backend='transformers' on CPU"):
        RolloutEngine("vllm", model_name_or_path="some/model")


class _FakeVLLMServer(BaseHTTPRequestHandler):
    """Answers like `vllm serve`: /v1/models and /v1/completions with token ids and logprobs."""

    requests = []

    def log_message(self, *args):
        pass

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"data": [{"id": "tiny"}]})

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(payload)
        choices = []
        for i, prompt in enumerate(payload["prompt"]):
            for j in range(payload["n"]):
                ids = [100 + i, 200 + j, 2, 7] if j == 0 else [100 + i, 300 + j, 301, 302]  # token 2 is a stop token
                choices.append(
                    {
                        "index": i * payload["n"] + j,
                        "text": "",
                        "finish_reason": "stop" if j == 0 else "length",
                        "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": [-0.5, -1.0, -0.1, -2.0]},
                    }
                )
        self._send({"choices": choices[::-1]})  # out of order on purpose


def test_server_mode_generate_parses_and_groups():
    from posttrain._rollout_vllm import VLLMBackend

    server = HTTPServer(("127.0.0.1", 0), _FakeVLLMServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        backend = VLLMBackend(mode="server", server_url=f"http://127.0.0.1:{server.server_port}")
        engine = RolloutEngine(backend)
        batch = engine.generate([[1, 2], [3]], SamplingParams(max_tokens=4, n=2, seed=3, stop_token_ids=(2,)))
        assert batch.prompt_ids == [[1, 2], [1, 2], [3], [3]]
        assert batch.completion_ids == [[100, 200, 2], [100, 301, 301, 302], [101, 200, 2], [101, 301, 301, 302]]
        assert batch.logprobs[0] == [-0.5, -1.0, -0.1] and batch.truncated == [False, True, False, True]
        sent = _FakeVLLMServer.requests[-1]
        assert sent["model"] == "tiny" and sent["prompt"] == [[1, 2], [3]] and sent["seed"] == 3 and sent["logprobs"] == 0
        with pytest.raises(RuntimeError, match="weight-transfer"):
            engine.update_weights(object())
    finally:
        server.shutdown()
        server.server_close()


def test_server_mode_unreachable_error():
    from posttrain._rollout_vllm import VLLMBackend

    backend = VLLMBackend(mode="server", server_url="http://127.0.0.1:9", request_timeout=2, served_model_name="m")
    with pytest.raises(RuntimeError, match="cannot reach the vLLM server"):
        backend.generate([[1]], SamplingParams(max_tokens=2))


@pytest.mark.gpu
def test_vllm_colocate_logprobs_and_weight_sync(tiny_model_dir):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain._ops import selective_log_softmax
    from posttrain._rollout_vllm import VLLMBackend

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
    backend = VLLMBackend(model, tok, gpu_memory_utilization=0.2, max_model_len=256, dtype="float32")
    prompts = [tok("the cat sat")["input_ids"], tok("hello world please think")["input_ids"]]
    sampling = SamplingParams(max_tokens=8, temperature=0.7, seed=0, n=2)
    batch = backend.generate(prompts, sampling)
    assert len(batch) == 4 and batch.prompt_ids[0] == batch.prompt_ids[1] == prompts[0]
    for p, c, lp in zip(batch.prompt_ids, batch.completion_ids, batch.logprobs):
        with torch.no_grad():
            logits = model(torch.tensor([p + c], device="cuda")).logits[:, len(p) - 1 : -1]
        ref = selective_log_softmax(logits, torch.tensor([c], device="cuda"), temperature=0.7)[0].cpu()
        torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-3, rtol=1e-3)
    assert backend.generate(prompts, sampling).completion_ids == batch.completion_ids  # seeded
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    backend.update_weights(model)
    assert backend.policy_version == 1
    after = backend.generate(prompts, sampling)
    assert after.policy_version == 1 and after.completion_ids != batch.completion_ids
