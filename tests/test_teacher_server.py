"""The teacher server (``posttrain.TeacherServer``) and its client: vLLM's prompt-logprobs protocol, exact log-probs, failures.

* served log-probs equal a float64 local forward (relative 1e-6) for the top-k and for the actual token, at
  temperature 1 and 0.7, with several forward batches and logit chunks;
* the answer has vLLM's shape (position 0 None, ranks 1..k, the actual token always present with its rank);
* TRL's own ``VLLMClient.get_sequence_logprobs`` works against it and equals :class:`TeacherServerClient`;
* every failure is one ``TeacherServerError`` line naming the URL and what came back: a server stopped mid-run, a
  timeout (a server that sleeps), an HTTP error, non-JSON, and wrong shapes from a fake upstream server;
* ``posttrain serve-teacher`` serves until stopped.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from posttrain import TeacherServer, TeacherServerClient, TeacherServerError

REL = 1e-6


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def server(model64, tiny_tokenizer):
    # small batches and chunks: three forwards, several logit chunks per forward
    with TeacherServer(model64, tiny_tokenizer, max_batch_tokens=24, chunk_size=3, model_name="tiny") as served:
        yield served


SEQUENCES = [[5, 17, 99, 3, 250, 41, 7], [300, 2, 2, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [401, 402]]
PROMPT_LENGTHS = [3, 1, 6, 1]


def _local(model, sequence, temperature):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0].double()
    return torch.log_softmax(logits / temperature, dim=-1)  # (T, V): row p - 1 predicts token p


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_served_logprobs_equal_a_float64_forward(server, model64, temperature):
    k = 4
    answer = TeacherServerClient(server.url).sequence_logprobs(SEQUENCES, PROMPT_LENGTHS, top_logprobs=k, temperature=temperature)
    T = max(len(s) - n for s, n in zip(SEQUENCES, PROMPT_LENGTHS))
    assert answer["logprobs"].shape == (4, T, k) and answer["actual_logprobs"].shape == (4, T, 1)
    for i, (sequence, n) in enumerate(zip(SEQUENCES, PROMPT_LENGTHS)):
        local = _local(model64, sequence, temperature)
        for t, position in enumerate(range(n, len(sequence))):
            values, ids = torch.topk(local[position - 1], k)
            assert answer["logprob_token_ids"][i, t].tolist() == ids.tolist()
            torch.testing.assert_close(answer["logprobs"][i, t], values, rtol=REL, atol=0)
            expected = local[position - 1, sequence[position]]
            assert abs(float(answer["actual_logprobs"][i, t, 0]) - float(expected)) <= REL * abs(float(expected))
            assert int(answer["actual_token_ids"][i, t, 0]) == sequence[position]
        # padding past this completion: -inf / 0, as TRL's client pads
        assert torch.isinf(answer["logprobs"][i, len(sequence) - n :]).all()
        assert (answer["logprob_token_ids"][i, len(sequence) - n :] == 0).all()


def test_answer_has_vllms_shape(server, tiny_tokenizer):
    body = {"model": "tiny", "prompt": SEQUENCES[:2], "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 2}
    answer = TeacherServerClient(server.url)._request("/v1/completions", body)
    assert answer["object"] == "text_completion" and answer["model"] == "tiny"
    for choice, sequence in zip(answer["choices"], SEQUENCES):
        positions = choice["prompt_logprobs"]
        assert len(positions) == len(sequence) and positions[0] is None
        for position in range(1, len(sequence)):
            entry = positions[position]
            ranks = sorted(item["rank"] for item in entry.values())
            assert ranks[:2] == [1, 2]
            actual = entry[str(sequence[position])]  # always present, with its true rank
            assert actual["rank"] >= 1 and len(entry) in (2, 3) and (len(entry) == 2) == (actual["rank"] <= 2)
            assert actual["decoded_token"] == tiny_tokenizer.decode([sequence[position]])
    client = TeacherServerClient(server.url)
    assert client.health() and client.model == "tiny"


def test_string_prompts_are_tokenized(server, tiny_tokenizer):
    client = TeacherServerClient(server.url)
    answer = client._request("/v1/completions", {"prompt": "What is 1 + 2?", "prompt_logprobs": 1, "max_tokens": 1})
    assert len(answer["choices"][0]["prompt_logprobs"]) == len(tiny_tokenizer("What is 1 + 2?", add_special_tokens=False)["input_ids"])


def test_trl_vllm_client_works_against_it(server, monkeypatch):
    pytest.importorskip("requests")  # TRL's client is built on requests (posttrain's dev extra)
    import trl.generation.vllm_client as vllm_client

    # the client refuses to start without the vllm package, which these HTTP calls never use
    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *a, **k: True)
    trl_client = vllm_client.VLLMClient(base_url=server.url, connection_timeout=10.0)
    assert trl_client.model == "tiny"
    theirs = trl_client.get_sequence_logprobs(SEQUENCES, PROMPT_LENGTHS, top_logprobs=3, temperature=0.7)
    ours = TeacherServerClient(server.url).sequence_logprobs(SEQUENCES, PROMPT_LENGTHS, top_logprobs=3, temperature=0.7)
    for i, (sequence, n) in enumerate(zip(SEQUENCES, PROMPT_LENGTHS)):
        length = len(sequence) - n
        assert len(theirs["logprobs"][i]) == length
        assert torch.equal(torch.tensor(theirs["logprobs"][i], dtype=torch.float64), ours["logprobs"][i, :length])
        assert torch.equal(torch.tensor(theirs["logprob_token_ids"][i]), ours["logprob_token_ids"][i, :length])
        assert torch.equal(torch.tensor(theirs["actual_logprobs"][i], dtype=torch.float64), ours["actual_logprobs"][i, :length])
        assert torch.equal(torch.tensor(theirs["actual_token_ids"][i]), ours["actual_token_ids"][i, :length])


def test_bad_requests_get_400_with_the_reason(server, model64):
    client = TeacherServerClient(server.url)
    cases = [
        ({"prompt": [[1, 2, 10**6]], "prompt_logprobs": 1}, "not a token id"),
        ({"prompt": [[1, 2]], "prompt_logprobs": 1, "max_tokens": 16}, "scores prompts only"),
        ({"prompt": [[1, 2]], "prompt_logprobs": -3}, "non-negative integer"),
        ({"prompt": []}, "non-empty list"),
    ]
    for body, reason in cases:
        with pytest.raises(TeacherServerError) as info:
            client._request("/v1/completions", body)
        message = str(info.value)
        assert "\n" not in message and f"{server.url}/v1/completions answered HTTP 400" in message and reason in message
    no_tokenizer = TeacherServer(model64).start()
    try:
        with pytest.raises(TeacherServerError, match="string prompts need a tokenizer"):
            TeacherServerClient(no_tokenizer.url)._request("/v1/completions", {"prompt": "hi", "prompt_logprobs": 1})
    finally:
        no_tokenizer.stop()


def test_client_rejects_impossible_requests_before_sending(server):
    client = TeacherServerClient(server.url)
    with pytest.raises(ValueError, match=r"prompt_lengths\[0\]=0 is outside"):
        client.sequence_logprobs([[1, 2, 3]], [0], top_logprobs=1)
    with pytest.raises(ValueError, match="one length per sequence"):
        client.sequence_logprobs([[1, 2, 3]], [1, 1], top_logprobs=1)


# ----------------------------------------------------------------------------- failures: one line naming the URL
def _one_line(info, url):
    message = str(info.value)
    assert "\n" not in message and url in message, message
    assert isinstance(info.value, TeacherServerError)
    return message


def test_a_server_stopped_mid_run_is_one_line(model64):
    served = TeacherServer(model64).start()
    url = served.url
    client = TeacherServerClient(url, max_retries=1)
    client.sequence_logprobs(SEQUENCES[:1], PROMPT_LENGTHS[:1], top_logprobs=1)  # up
    served.stop()  # killed mid-run
    with pytest.raises(TeacherServerError) as info:
        client.sequence_logprobs(SEQUENCES[:1], PROMPT_LENGTHS[:1], top_logprobs=1)
    assert "is unreachable" in _one_line(info, url) and "serve-teacher" in str(info.value)


def test_a_timeout_is_one_line(model64):
    class Sleepy(TeacherServer):
        def score(self, *args, **kwargs):
            time.sleep(1.5)
            return super().score(*args, **kwargs)

    with Sleepy(model64) as served:
        client = TeacherServerClient(served.url, timeout=0.3, max_retries=2)
        started = time.monotonic()
        with pytest.raises(TeacherServerError) as info:
            client.sequence_logprobs(SEQUENCES[:1], PROMPT_LENGTHS[:1], top_logprobs=1)
        assert time.monotonic() - started < 1.4  # a timeout is not retried
        assert "did not answer within 0.3 s" in _one_line(info, served.url)


class _Fake:
    """A tiny upstream HTTP server answering every request with a canned (status, body): the peer of the client under test."""

    def __init__(self, status: int, body: bytes):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(fake.status if self.path.startswith("/v1/completions") else 200)
                data = fake.body if self.path.startswith("/v1/completions") else json.dumps({"data": [{"id": "fake"}]}).encode()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self.status, self.body = status, body
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _choice(positions):
    return json.dumps({"choices": [{"index": 0, "prompt_logprobs": positions}]}).encode()


GOOD = [None, {"17": {"logprob": -0.5, "rank": 1}}, {"99": {"logprob": -0.1, "rank": 1}}, {"3": {"logprob": -2.0, "rank": 1}}]


@pytest.mark.parametrize("status,body,expected", [
    (200, b"<html>502 Bad Gateway from the proxy</html>", "is not JSON: '<html>502 Bad Gateway from the proxy</html>'"),
    (500, b'{"error": {"message": "CUDA out of memory"}}', 'answered HTTP 500: {"error": {"message": "CUDA out of memory"}}'),
    (200, b'{"object": "error", "message": "model not loaded"}', "answered no 'choices' list for 1 sequences"),
    (200, json.dumps({"choices": []}).encode(), "answered 0 choices for 1 sequences"),
    (200, _choice(GOOD[:3]), "answered 3 prompt_logprobs positions for sequence 0 of 4 tokens"),
    (200, _choice([None, {"17": {"logprob": -0.5, "rank": 1}}, {"5": {"logprob": -0.1, "rank": 1}}, GOOD[3]]), "without {token_id: {logprob, rank}} for the actual token 99"),
    (200, _choice([None, {"17": {"logprob": -0.5}}, GOOD[2], GOOD[3]]), "position 1 of sequence 0"),
    (200, b"x" * 5000, "x" * 150),
])
def test_wrong_answers_are_one_line(status, body, expected):
    fake = _Fake(status, body)
    try:
        with pytest.raises(TeacherServerError) as info:
            TeacherServerClient(fake.url, max_retries=0).sequence_logprobs([[5, 17, 99, 3]], [1], top_logprobs=1)
        message = _one_line(info, fake.url)
        assert expected in message, message
        assert len(message) < 600  # what came back is cut to its first 200 characters
    finally:
        fake.close()


def test_a_well_formed_fake_answer_is_read():
    fake = _Fake(200, _choice(GOOD))
    try:
        answer = TeacherServerClient(fake.url).sequence_logprobs([[5, 17, 99, 3]], [1], top_logprobs=2)
    finally:
        fake.close()
    assert answer["logprobs"][0, :, 0].tolist() == [-0.5, -0.1, -2.0] and math.isinf(answer["logprobs"][0, 0, 1])
    assert answer["actual_logprobs"][0, :, 0].tolist() == [-0.5, -0.1, -2.0]


def test_cli_serve_teacher(tiny_model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "posttrain", "serve-teacher", tiny_model_dir, "--port", "0", "--dtype", "float64"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert "serving" in line and "http://127.0.0.1:" in line, (line, process.stderr.read() if process.poll() is not None else "")
        url = line.split(" at ")[1].split()[0]
        client = TeacherServerClient(url)
        assert client.health() and client.model == tiny_model_dir
        assert client.sequence_logprobs([[5, 17, 99]], [1], top_logprobs=2)["logprobs"].shape == (1, 2, 2)
    finally:
        process.terminate()
        process.wait(timeout=30)
