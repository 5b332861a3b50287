"""Feasibility probe for issue 21: on 2 cores, does 1 generation process + 1 trainer process beat synchronous GRPO-like steps?

sync : per step, generate B x G completions (torch threads = 2), then one optimizer step on them (threads = 2).
async: a spawned worker (1 thread) generates continuously into a bounded queue (maxsize = ahead), reading the
       trainer's weights from shared memory when their version moves; the trainer (1 thread) takes a batch, steps,
       and publishes its weights (copy into the shared tensors) every step. Staleness = trainer version - sample version.
Measures completions trained per second over the measured steps (after warm-up).

Not the issue's benchmark (no posttrain code runs here: it is a bare PyTorch probe of the hardware's headroom, written
before the async producer exists). ``python -m bench.async_probe [--hidden 256 --layers 4 ...]``. Measured 2026-12-06
on this project's 2-core CPU machine, 2 rounds each (sync / async completions per second, ratio):

* hidden 64 x 2 layers, 16 completions x 32 tokens: 240 / 301 (1.25x), 208 / 294 (1.42x); the trainer waits on
  generation 58-62% of the time (generation is the bottleneck); ``--ahead 2``: 1.21x, 1.12x.
* hidden 256 x 4 layers, same batch: 56.6 / 86.3 (1.52x), 64.8 / 84.1 (1.30x); the trainer waits 8-9%.
* hidden 256 x 4 layers, 32 completions x 16 tokens: 1.06x, 1.05x (training dominates; the trainer waits 2%).

With one process per core, async wins only the cores' idle time of the synchronous run (2 threads scale poorly on
tiny ops), so it reaches ~1.5x only where generation and training take about the same time: the async producer
needs the balance (workers, batch, completion length) measured and reported, not assumed.
"""
import argparse
import os
import time

import torch
import torch.multiprocessing as mp


def build(hidden, layers, seed=0):
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=hidden, num_layers=layers, seed=seed)
    return model, tok


def prompts(tok, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 400, (16,), generator=g).tolist() for _ in range(n)]


def generate(model, tok, batch_prompts, max_new, seed):
    torch.manual_seed(seed)
    ids = torch.tensor(batch_prompts)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=max_new,
                             min_new_tokens=max_new, pad_token_id=tok.pad_token_id, top_k=0, top_p=1.0)
    return out


def train_step(model, opt, seqs, prompt_len):
    logits = model(input_ids=seqs).logits[:, prompt_len - 1 : -1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, seqs[:, prompt_len:, None])[..., 0]
    adv = torch.randn(seqs.shape[0], 1)
    loss = -(adv * logp).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def worker(shared, version, queue, stop, a):
    torch.set_num_threads(a.gen_threads)
    model, tok = build(a.hidden, a.layers)
    model.eval()
    seen = -1
    step = 0
    while not stop.is_set():
        v = version.value
        if v != seen:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(shared[name])
            seen = v
        seqs = generate(model, tok, prompts(tok, a.batch, step) * 1, a.max_new, step)
        queue.put((seqs, seen))
        step += 1


def run_sync(a):
    torch.set_num_threads(a.threads)
    model, tok = build(a.hidden, a.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(a.warmup + a.steps):
        t = time.perf_counter()
        model.eval()
        seqs = generate(model, tok, prompts(tok, a.batch, step), a.max_new, step)
        model.train()
        train_step(model, opt, seqs, 16)
        times.append(time.perf_counter() - t)
    steady = times[a.warmup:]
    return a.batch * len(steady) / sum(steady), []


def run_async(a):
    ctx = mp.get_context("spawn")
    torch.set_num_threads(a.train_threads)
    model, tok = build(a.hidden, a.layers)
    shared = {n: p.detach().clone().share_memory_() for n, p in model.named_parameters()}
    version = ctx.Value("i", 0)
    queue = ctx.Queue(maxsize=a.ahead)
    stop = ctx.Event()
    proc = ctx.Process(target=worker, args=(shared, version, queue, stop, a), daemon=True)
    proc.start()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    ends, stale, waits = [], [], []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        seqs, v = queue.get(timeout=600)
        waits.append(time.perf_counter() - t0)
        stale.append(step - v)
        train_step(model, opt, seqs, 16)
        with torch.no_grad():
            for n, p in model.named_parameters():
                shared[n].copy_(p)
        version.value = step + 1
        ends.append(time.perf_counter())
    stop.set()
    try:
        while True:
            queue.get_nowait()
    except Exception:
        pass
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
    steady = ends[a.warmup:]
    dt = steady[-1] - ends[a.warmup - 1]
    wait_frac = sum(waits[a.warmup:]) / dt
    return a.batch * (len(steady)) / dt, (stale[a.warmup:], round(wait_frac, 3))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gen-threads", type=int, default=1)
    p.add_argument("--train-threads", type=int, default=1)
    p.add_argument("--ahead", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for r in range(a.repeats):
        s, _ = run_sync(a)
        x, (stale, wait) = run_async(a)
        print(f"hidden {a.hidden} x {a.layers}, batch {a.batch}, {a.max_new} new tokens, ahead {a.ahead}: sync {s:.1f} completions/s, "
              f"async {x:.1f} completions/s -> ratio {x / s:.2f}; staleness {sorted(set(stale))}, trainer waiting {wait:.0%}", flush=True)
