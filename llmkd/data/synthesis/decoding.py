"""Batched decoding with a KV cache, left padding and one random stream per sample.

`model.generate` samples every row from the one global RNG, so a row's tokens would depend on its batch
neighbours; here each row owns a CPU `torch.Generator` and draws exactly one uniform per step, turned into a
token by inverse-CDF sampling on the model's device."""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import DynamicCache

from llmkd.data.collate import pad_rows


def sample_batch(model, prompts, seeds, options, *, eos_ids, pad_id: int, store_topk: int = 0) -> list[dict]:
    """Continues every prompt (a list of token ids) with the model; one result dict per prompt.

    Each result has `generated_ids` (ending with the EOS token when one was produced), `finish_reason`
    ('eos' or 'length') and, with store_topk=k > 0, `topk_ids` / `topk_logprobs`: per generated position the
    k most likely tokens and their log-probabilities under the model at temperature 1, before top-k/top-p.
    `options` carries max_new_tokens, do_sample, greedy_tokens, temperature, top_k and top_p."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (a BOS or start token)")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
    with eval_mode(model), torch.inference_mode():
        return _decode(model, prompts, generators, options, eos, pad_id, store_topk)


def _decode(model, prompts, generators, options, eos, pad_id, store_topk) -> list[dict]:
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
    cache = _new_cache(model)
    logits = _forward(model, ids, mask, positions, cache)
    rows = [{"generated_ids": [], "finish_reason": "length"} for _ in prompts]
    if store_topk:
        for row in rows:
            row["topk_ids"], row["topk_logprobs"] = [], []
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for step in range(options.max_new_tokens):
        # Drawn on every step, greedy or not, so a row's stream never depends on the others.
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
        tokens = choose_tokens(logits, uniforms.to(device), step, options).cpu()
        topk = logits.log_softmax(-1).topk(store_topk, dim=-1) if store_topk else None
        hit_eos = torch.isin(tokens, eos)
        _record(rows, done, tokens, hit_eos, topk)
        done |= hit_eos
        if bool(done.all()) or step + 1 == options.max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=-1)
        positions = positions[:, -1:] + 1
        logits = _forward(model, tokens[:, None].to(device), mask, positions, cache)
    return rows


def _record(rows, done, tokens, hit_eos, topk) -> None:
    """Appends this step's token (and top-k) to every row still running; a row's EOS token is kept."""
    if topk is not None:
        values, indices = topk.values.cpu().tolist(), topk.indices.cpu().tolist()
    for i, row in enumerate(rows):
        if done[i]:
            continue
        row["generated_ids"].append(int(tokens[i]))
        if topk is not None:
            row["topk_ids"].append(indices[i])
            row["topk_logprobs"].append(values[i])
        if hit_eos[i]:
            row["finish_reason"] = "eos"


def choose_tokens(logits: torch.Tensor, uniforms: torch.Tensor, step: int, options) -> torch.Tensor:
    """Greedy for the first `greedy_tokens` steps (or always without do_sample), else inverse-CDF sampling."""
    if not options.do_sample or step < options.greedy_tokens:
        return logits.argmax(-1)
    probs = filtered_probs(logits, options.temperature, options.top_k, options.top_p)
    cdf = probs.double().cumsum(-1)
    # right=True skips zero-probability tokens: the first index whose cumulative mass exceeds u * total.
    picks = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1])[:, None], right=True)
    return picks.squeeze(-1).clamp(max=logits.shape[-1] - 1)


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Softmax of logits / temperature, restricted to the top-k tokens and then to the top-p nucleus."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -torch.inf)
    probs = scores.softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is < top_p: the most likely token always survives.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs


def left_pad(prompts, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding keeps every row's last token in the last column, where the next token is read; positions
    are given explicitly (from the mask), so a row's tokens keep positions 0..n-1 as in training."""
    batch = pad_rows([{"input_ids": list(p)} for p in prompts], pad_id, side="left")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def _forward(model, ids, mask, positions, cache) -> torch.Tensor:
    """Last-position logits in float32; the cache is updated in place."""
    params = _forward_params(type(model))
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True}
    # transformers 5.x renamed past_key_values to cache; accept either spelling.
    kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1  # the prompt's other positions need no vocabulary projection
    return model(**kwargs).logits[:, -1].float()


def _forward_params(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def _new_cache(model):
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature without config
        return DynamicCache()


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off while decoding; the caller's train/eval state comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids from the generation config (chat models list several, e.g. <|eot_id|>), else the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return {int(i) for i in ids}
