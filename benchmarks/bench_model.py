"""lmforge vs Hugging Face transformers, side by side in one run, same weights and config.

    python benchmarks/bench_model.py [--rounds 5] [--device cpu|cuda] [--out FILE.json]

Measures
- training tokens/s (forward + backward + AdamW step) and MFU against this device's
  measured matmul peak, for lmforge's `Transformer` and `LlamaForCausalLM`;
- generation tokens/s, greedy with a KV cache, at batch 1 and batch 16, lmforge's
  `generate` vs transformers' `generate` (every row forced to the full length); lmforge
  twice: with its C++ decoding step (the default on CPU, `lmforge.model.native`) and with
  the PyTorch step (`LMFORGE_NATIVE=0`); and one decoding step alone, through each.
Rounds alternate between the two so that machine noise hits both alike; medians are reported,
with the ratio lmforge / transformers (above 1 means lmforge is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.generate import generate
from lmforge.model import KVCache, Transformer
from lmforge.model.hf import hf_config
from lmforge.model.native import NativeStep
from lmforge.train_utils import autocast, autocast_dtype, measure_matmul_flops


def hf_twin(model: Transformer):
    """The Hugging Face model `lmforge export` would write: same config (through
    `hf_config`, so LlamaForCausalLM here) and weights (names map one to one)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf_config(model.cfg))
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    hf.load_state_dict(model.state_dict())
    return hf.to(next(model.parameters()).device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step_time(model, x, optimizer, device, amp_dtype, hf: bool) -> float:
    sync(device)
    start = time.perf_counter()
    with autocast(device, amp_dtype):
        logits = model(x[:, :-1]).logits if hf else model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def generate_time(
    model, prompts: torch.Tensor, new_tokens: int, device, engine: str
) -> tuple[float, list]:
    """Seconds to generate greedily, and the tokens: engine "transformers", "lmforge" or
    "lmforge_pytorch" (lmforge without its C++ decoding step)."""
    sync(device)
    start = time.perf_counter()
    if engine == "transformers":
        with torch.inference_mode():
            out = model.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
                eos_token_id=None,
            )
        rows = out[:, prompts.size(1) :].tolist()
    else:
        os.environ["LMFORGE_NATIVE"] = "0" if engine == "lmforge_pytorch" else "1"
        try:
            rows = generate(model, prompts.tolist(), new_tokens, temperature=0.0)
        finally:
            del os.environ["LMFORGE_NATIVE"]
    sync(device)
    return time.perf_counter() - start, rows


def step_seconds(model: Transformer, batch: int, rounds: int) -> dict[str, float]:
    """Median seconds of one decoding step alone, C++ ("native") and PyTorch's ("pytorch"),
    by turns on one cache holding 48 positions (each round rewinds it): `batch` rows of one
    new token, the logits out."""
    cfg = model.cfg
    prompts = torch.randint(0, cfg.vocab_size, (batch, 48))
    tokens = torch.randint(0, cfg.vocab_size, (batch,))
    cache = KVCache.empty(cfg, batch, 49, "cpu", torch.float32)
    native_step = NativeStep.of(model)
    if native_step is None:
        return {}
    times: dict[str, list[float]] = {"native": [], "pytorch": []}
    # PyTorch's step with its weight copies made, once, as generate makes them once a call
    with torch.inference_mode(), model.inference_layout():
        model.hidden_states(prompts, cache=cache)
        for _ in range(rounds + 1):  # the first round warms up
            for name in times:
                start = time.perf_counter()
                for _ in range(20):
                    cache.length = 48
                    if name == "native":
                        native_step(tokens, torch.full((batch,), 48), None, cache)
                    else:
                        model.lm_head(model.hidden_states(tokens[:, None], cache=cache)[:, -1])
                times[name].append((time.perf_counter() - start) / 20)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=None, help="also write the figures as JSON")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile'd lmforge training row"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    # the default pipeline's model (configs are data: ModelConfig's defaults), 4096-token vocab
    cfg = ModelConfig(vocab_size=4096)
    ours = Transformer(cfg).to(device)
    theirs = hf_twin(ours)
    amp_dtype = autocast_dtype("auto", device)
    peak = measure_matmul_flops(device, amp_dtype or torch.float32)
    results: dict[str, float | str] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "parameters": ours.num_params(),
        "peak_matmul_gflops": round(peak / 1e9, 1),
    }

    # ---- training ----
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    opts = {
        "lmforge": torch.optim.AdamW(ours.parameters(), lr=1e-4),
        "transformers": torch.optim.AdamW(theirs.parameters(), lr=1e-4),
    }
    models = {"lmforge": ours, "transformers": theirs}
    trainers = dict(models)
    if not args.no_compile:  # the same module as pretrain.compile=true trains
        trainers["lmforge_compiled"] = torch.compile(ours)
        opts["lmforge_compiled"] = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for name in trainers:  # warm-up (and compilation)
        train_step_time(trainers[name], x, opts[name], device, amp_dtype, name == "transformers")
    for _ in range(args.rounds):
        for name in trainers:
            t = train_step_time(
                trainers[name], x, opts[name], device, amp_dtype, name == "transformers"
            )
            times[name].append(t)
    tokens = args.batch * args.seq_len
    for name in trainers:
        tok_s = tokens / statistics.median(times[name])
        results[f"train_tok_s_{name}"] = round(tok_s, 1)
        results[f"train_mfu_{name}"] = round(tok_s * ours.flops_per_token(args.seq_len) / peak, 4)
    for name in trainers:
        if name != "transformers":
            ratio = results[f"train_tok_s_{name}"] / results["train_tok_s_transformers"]
            results[f"train_ratio_{name}"] = round(ratio, 3)

    # ---- generation ----
    theirs.load_state_dict(ours.state_dict())  # training moved each copy its own way
    ours.eval()
    theirs.eval()
    engines = {"lmforge": ours, "lmforge_pytorch": ours, "transformers": theirs}
    for batch in (1, 16):
        prompts = torch.randint(0, cfg.vocab_size, (batch, 16), device=device)
        gen_times: dict[str, list[float]] = {name: [] for name in engines}
        outputs = {}
        for name, model in engines.items():  # warm-up (and the C++ step's build)
            generate_time(model, prompts, 4, device, name)
        for _ in range(args.rounds):
            for name, model in engines.items():
                t, outputs[name] = generate_time(model, prompts, args.new_tokens, device, name)
                gen_times[name].append(t)
        for name in engines:
            tok_s = batch * args.new_tokens / statistics.median(gen_times[name])
            results[f"gen_b{batch}_tok_s_{name}"] = round(tok_s, 1)
        for name in ("lmforge", "lmforge_pytorch"):
            ratio = (
                results[f"gen_b{batch}_tok_s_{name}"] / results[f"gen_b{batch}_tok_s_transformers"]
            )
            results[f"gen_b{batch}_ratio_{name}"] = round(ratio, 3)
        same = outputs["lmforge"] == outputs["lmforge_pytorch"] == outputs["transformers"]
        results[f"gen_b{batch}_same_tokens"] = str(same)
        if device.type == "cpu":
            for name, seconds in step_seconds(ours, batch, args.rounds * 3).items():
                results[f"gen_b{batch}_step_ms_{name}"] = round(seconds * 1e3, 3)

    for key, value in results.items():
        print(f"{key:32s} {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
