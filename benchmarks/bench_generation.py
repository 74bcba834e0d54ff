"""Causal-LM measurements: generation throughput (llmkd's batched sampler vs batch-1 `generate()`), decoding
speed and perplexity on real text.

    python -m benchmarks.bench_generation [--model DIR] [--batch-size 32] [--new-tokens 32] [--out FILE.json]

Generation throughput: llmkd's sampler (`llmkd.data.synthesis.decoding.sample_batch`, the core of
`sample_teacher` and ZeroGen's generator: left padding, one KV cache, one seeded stream per row) decodes
`batch_size` sequences at once; the baseline is plain `model.generate()` on one sequence at a time, which is what
a user without a batched sampler runs. Both start from the same prompt, sample with the same settings and produce
exactly `new_tokens` tokens per sequence (EOS is ignored by both), and both are measured in the same process,
one after the other, after a warm-up, so the ratio is not skewed by other jobs on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from types import SimpleNamespace

import torch

from llmkd.atomic import write_json
from llmkd.data.synthesis.common import derive_seed
from llmkd.data.synthesis.decoding import eval_mode, sample_batch
from llmkd.data.synthesis.sampling import chat_template_prefix


def start_prompt(tokenizer) -> list[int]:
    """The chat template up to the user's text (Magpie) for instruct tokenizers, else [BOS]."""
    if getattr(tokenizer, "chat_template", None):
        return chat_template_prefix(tokenizer)
    if tokenizer.bos_token_id is None:
        raise ValueError("the tokenizer has neither a chat template nor a BOS token to start from")
    return [tokenizer.bos_token_id]


def _options(new_tokens: int, do_sample: bool, top_p: float, temperature: float):
    return SimpleNamespace(
        max_new_tokens=new_tokens,
        do_sample=do_sample,
        greedy_tokens=0,
        temperature=temperature,
        top_k=0,
        top_p=top_p,
    )


def sampler_speed(
    model, prompt, *, batch_size, new_tokens, seed=0, do_sample=True, top_p=1.0, temperature=1.0
):
    """tokens/s of llmkd's batched sampler: batch_size copies of `prompt`, exactly new_tokens tokens each."""
    options = _options(new_tokens, do_sample, top_p, temperature)
    seeds = [derive_seed(seed, i, "decode") for i in range(batch_size)]
    start = time.perf_counter()
    # No EOS ids: every row runs to new_tokens, so both sides generate the same number of tokens.
    rows = sample_batch(model, [list(prompt)] * batch_size, seeds, options, eos_ids=set(), pad_id=0)
    seconds = time.perf_counter() - start
    tokens = sum(len(r["generated_ids"]) for r in rows)
    return {"sequences": batch_size, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def generate_speed(
    model, prompt, *, sequences, new_tokens, seed=0, do_sample=True, top_p=1.0, temperature=1.0
):
    """tokens/s of plain batch-1 `model.generate()`, one sequence after the other."""
    ids = torch.tensor([list(prompt)], device=next(model.parameters()).device)
    kwargs = {"do_sample": do_sample, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    kwargs |= {"top_p": top_p, "temperature": temperature, "top_k": 0} if do_sample else {}
    tokens, start = 0, time.perf_counter()
    with eval_mode(model), torch.inference_mode():
        for i in range(sequences):
            torch.manual_seed(derive_seed(seed, i, "decode"))
            out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kwargs)
            tokens += out.shape[1] - ids.shape[1]
    seconds = time.perf_counter() - start
    return {"sequences": sequences, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def benchmark_generation(
    model,
    tokenizer,
    *,
    batch_size=32,
    new_tokens=32,
    baseline_sequences=2,
    seed=0,
    top_p=1.0,
    temperature=1.0,
) -> dict:
    """Batched sampler vs batch-1 generate(), side by side in one process; returns both and the ratio."""
    if batch_size < 1 or new_tokens < 1 or baseline_sequences < 1:
        raise ValueError(
            f"batch_size ({batch_size}), new_tokens ({new_tokens}) and baseline_sequences ({baseline_sequences})"
            " must all be >= 1"
        )
    prompt = start_prompt(tokenizer)
    common = {"new_tokens": new_tokens, "seed": seed, "top_p": top_p, "temperature": temperature}
    # Warm-up: first calls pay for allocations and kernel selection, which is not decoding speed.
    sampler_speed(model, prompt, batch_size=batch_size, **common | {"new_tokens": 2})
    generate_speed(model, prompt, sequences=1, **common | {"new_tokens": 2})
    batched = sampler_speed(model, prompt, batch_size=batch_size, **common)
    plain = generate_speed(model, prompt, sequences=baseline_sequences, **common)
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "batched_sampler": batched,
        "generate_batch1": plain,
        "speedup": batched["tokens_per_s"] / plain["tokens_per_s"],
    }


def decode_speed(model, tokenizer, *, new_tokens=32, repeats=2) -> dict:
    """Greedy batch-1 decoding tokens/s (what a deployed student serves), best of `repeats` after a warm-up."""
    prompt = start_prompt(tokenizer)
    sampler_speed(model, prompt, batch_size=1, new_tokens=2, do_sample=False)
    runs = [
        sampler_speed(model, prompt, batch_size=1, new_tokens=new_tokens, do_sample=False)["tokens_per_s"]
        for _ in range(repeats)
    ]
    return {"new_tokens": new_tokens, "repeats": repeats, "tokens_per_s": max(runs)}


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], *, max_length=256, batch_size=8) -> dict:
    """Token-weighted perplexity exp(Σ NLL / N) over every next-token target of every text.

    Each text is tokenised on its own (the tokenizer's special tokens included, truncated to max_length) and
    scored from its first token: position t predicts token t+1, padding is never a target.
    """
    if not texts:
        raise ValueError("perplexity needs at least one text")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    with eval_mode(model):
        for first in range(0, len(texts), batch_size):
            encoded = [
                tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
                for t in texts[first : first + batch_size]
            ]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(encoded):
                ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # the causal shift; padding is no target
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum")
            total += float(nll)
            count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("no text has two tokens: nothing to predict")
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count, "texts": len(texts)}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="causal LM directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="sequences the batched sampler decodes at once"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=32, help="tokens generated per sequence, both sides"
    )
    parser.add_argument("--baseline-sequences", type=int, default=2, help="batch-1 generate() calls timed")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights dtype"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse(argv)
    if args.model is None:
        from llmkd.data.assets.smollm2 import smollm2_path

        args.model = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    result = {"model": args.model, "dtype": args.dtype} | benchmark_generation(
        model,
        tokenizer,
        batch_size=args.batch_size,
        new_tokens=args.new_tokens,
        baseline_sequences=args.baseline_sequences,
        seed=args.seed,
    )
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
