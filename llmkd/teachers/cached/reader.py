"""`CachedTeacher`: a teacher source served from a cache folder — no weights; rows found by `cache_index`."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from llmkd import modeling as A
from llmkd.teachers.base import TeacherOutputs, TeacherSource, TopK
from llmkd.teachers.cached import fingerprint as F
from llmkd.teachers.cached.writer import MANIFEST, _shard_meta

CACHE_COLUMN = "cache_index"

REPAIR = (
    "re-run `llmkd cache-teacher RECIPE.yaml` with the same settings: it keeps the intact shards and redoes "
    "the damaged ones"
)


def read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{path} is not a finished teacher cache (no {MANIFEST}); run `llmkd cache-teacher RECIPE.yaml` "
            "first, or let it finish (a restart continues where it stopped)"
        )
    with open(file, encoding="utf-8") as handle:
        manifest = json.load(handle)
    if manifest.get("format") != F.FORMAT or manifest.get("version") != F.VERSION:
        raise F.CacheMismatchError(
            f"{file} is format {manifest.get('format')}/{manifest.get('version')}, this llmkd reads "
            f"{F.FORMAT}/{F.VERSION}; rebuild the cache with `llmkd cache-teacher`"
        )
    return manifest


def _config(values: dict) -> PretrainedConfig:
    model_type = values.get("model_type")
    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:  # a remote-code architecture: the generic config still carries the sizes
        cls = PretrainedConfig
    return cls.from_dict(values)


class CachedTeacher(TeacherSource):
    """The teacher's outputs, read from a cache written by :func:`llmkd.teachers.cached.writer.write_cache`.

    Opening checks that every shard is present, complete and of this cache's fingerprint. Each call checks
    that the batch's token ids (its attention-masked part) equal the cached ids of its ``cache_index`` rows.
    Classifier caches hold all logits (untempered); causal-LM caches the top-k log-probabilities at the cache's
    temperature plus the rest's log-mass, served as `TopK` aligned with the student's positions (full width
    rather than T - 1: the loss then runs on the student's logits unsliced, which saves the backward of a slice).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.manifest = read_manifest(self.path)
        self.fingerprint = self.manifest["fingerprint"]
        self.components = self.manifest["components"]
        self.task = self.manifest["task"]
        self.k = self.manifest["k"]
        self.temperature = self.manifest["temperature"]
        self.vocab_size = self.manifest["vocab_size"]
        self.num_rows = self.manifest["num_rows"]
        self.splits = self.manifest["splits"]
        self.config = _config(self.manifest["teacher_config"])
        self._rows_per_shard = self.manifest["rows_per_shard"]
        self._handles, self._offsets = {}, {}
        for entry in self.manifest["shards"]:
            self._check_shard(entry)
        self.provides = frozenset({"logits"} if self.task == A.SEQ_CLS else {"logits", "topk"})

    def columns(self) -> set[str]:
        return {CACHE_COLUMN}

    def required_columns(self) -> set[str]:
        # Added by llmkd.teachers.cached.binding.cached_trainer_kwargs / attach_cache_index.
        return {CACHE_COLUMN}

    def check(self, pair) -> None:
        """The student's tokenizer and vocabulary must be the cache's (the cached ids would mean other tokens)."""
        key = self.components.get("tokenizer")
        tokenizer = pair.student_tokenizer
        if tokenizer is not None and key is not None and F.tokenizer_key(tokenizer) != key:
            raise F.CacheMismatchError(
                f"the student's tokenizer differs from the one the teacher cache {self.path} was built with; "
                f"the cached token ids would mean other tokens. {F.FIX}"
            )
        dtype = pair.args.teacher_dtype
        if dtype != "auto" and self.components.get("teacher_dtype") not in (None, dtype):
            raise F.CacheMismatchError(
                f"teacher_dtype={dtype} but the teacher cache {self.path} was computed in "
                f"{self.components['teacher_dtype']}; set teacher_dtype: {self.components['teacher_dtype']} or {F.FIX}"
            )
        rows = A.output_rows(pair.student)
        if self.task == A.CAUSAL_LM and rows != self.vocab_size:
            raise ValueError(
                f"vocabulary mismatch: the student has {rows} logit rows, the cached teacher {self.vocab_size}; "
                "a cache serves students of the teacher's vocabulary only"
            )

    def check_components(self, expected: dict) -> None:
        """Refuses (CacheMismatchError) when a given component (None = unchecked) differs from the cache's."""
        F.check_components(expected, self.components, self.path)

    def _check_shard(self, entry: dict) -> None:
        path = os.path.join(self.path, entry["file"])
        if not os.path.isfile(path):
            raise F.CacheMismatchError(
                f"shard {entry['file']} of the teacher cache {self.path} is missing; {REPAIR}"
            )
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise F.CacheMismatchError(
                f"shard {entry['file']} of the teacher cache {self.path} has {size} bytes but the manifest records "
                f"{entry['bytes']}: it is truncated or was replaced; {REPAIR}"
            )
        meta = _shard_meta(path)
        if meta.get("fingerprint") != self.fingerprint or meta.get("rows") != "{},{}".format(*entry["rows"]):
            raise F.CacheMismatchError(
                f"shard {entry['file']} in {self.path} is unreadable or belongs to another cache; {REPAIR}"
            )

    def _shard(self, index: int):
        if index not in self._handles:
            handle = safe_open(os.path.join(self.path, self.manifest["shards"][index]["file"]), "pt")
            names = ("row_offsets", "pos_offsets") if self.task == A.CAUSAL_LM else ("row_offsets",)
            self._offsets[index] = {n: handle.get_tensor(n).tolist() for n in names}
            self._handles[index] = handle
        return self._handles[index], self._offsets[index]

    def row(self, index: int) -> dict:
        """One cached row: ``input_ids`` and ``logits`` (classifiers) or ``topk_*``/``rest_logmass`` (LMs)."""
        if not 0 <= index < self.num_rows:
            raise IndexError(
                f"cache_index {index} is out of range: the cache {self.path} holds {self.num_rows} rows"
            )
        shard, local = divmod(index, self._rows_per_shard)
        handle, offsets = self._shard(shard)
        a, b = offsets["row_offsets"][local : local + 2]
        out = {"input_ids": handle.get_slice("input_ids")[a:b].to(torch.int64)}
        if self.task == A.SEQ_CLS:
            out["logits"] = handle.get_slice("logits")[local : local + 1][0]
            return out
        p, q = offsets["pos_offsets"][local : local + 2]
        out["topk_ids"] = handle.get_slice("topk_ids")[p:q].to(torch.int64)
        out["topk_logprobs"] = handle.get_slice("topk_logprobs")[p:q].float()
        out["rest_logmass"] = handle.get_slice("rest_logmass")[p:q].float()
        return out

    def outputs(self, batch: dict, flags: dict) -> TeacherOutputs:
        """The cached outputs of the batch's rows (found by `cache_index`, their ids checked)."""
        if "cache_index" not in batch:
            raise ValueError(
                "the batch has no cache_index column: add it with llmkd.teachers.cached.binding.attach_cache_index("
                "dataset, cache, split) (cached_trainer_kwargs does) so each row finds its cached teacher outputs"
            )
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        # Row look-ups need the indices on the CPU anyway: check there, then move the result once.
        ids = input_ids.cpu()
        mask = (
            attention_mask.bool().cpu()
            if attention_mask is not None
            else torch.ones_like(ids, dtype=torch.bool)
        )
        indices = batch["cache_index"].view(-1).tolist()
        rows = [self.row(i) for i in indices]
        starts = self._check_ids(ids, mask, rows, indices)
        if self.task == A.SEQ_CLS:
            return TeacherOutputs(logits=torch.stack([r["logits"] for r in rows]).to(input_ids.device))
        return TeacherOutputs(topk=self._aligned(ids, mask, starts, rows).to(input_ids.device))

    def _check_ids(self, input_ids, mask, rows, indices) -> list[int]:
        """Each row's attention-masked ids must be the cached ids; returns where each row's tokens start."""
        starts = []
        for b, (row, index) in enumerate(zip(rows, indices)):
            real = mask[b].nonzero().flatten()
            start = int(real[0]) if len(real) else 0
            if len(real) and int(real[-1]) - start + 1 != len(real):
                raise ValueError(
                    f"batch row {b}: its attention mask has holes; a cached row must be contiguous"
                )
            ids, cached = input_ids[b, real], row["input_ids"]
            if len(ids) != len(cached) or not torch.equal(ids, cached):
                first = next(
                    (t for t, (x, y) in enumerate(zip(ids.tolist(), cached.tolist())) if x != y), None
                )
                raise F.CacheMismatchError(
                    f"batch row {b} (cache_index {index}) has {len(ids)} token ids that differ from the cached "
                    f"row's {len(cached)} (first difference at token {first if first is not None else min(len(ids), len(cached))}): "
                    f"the data or its tokenisation changed since the cache was built; {F.FIX}"
                )
            starts.append(start)
        return starts

    def _aligned(self, input_ids, mask, starts, rows) -> TopK:
        """Dense (B, T, k) tensors aligned with the student's positions; uncovered ones hold a one-hot."""
        batch, width = input_ids.shape
        ids = torch.arange(self.k).expand(batch, width, self.k).clone()
        logprobs = torch.full((batch, width, self.k), float("-inf"))
        logprobs[..., 0] = 0.0
        rest = torch.full((batch, width), float("-inf"))
        covered = torch.zeros(batch, width, dtype=torch.bool)
        for b, (start, row) in enumerate(zip(starts, rows)):
            n = len(row["rest_logmass"])
            ids[b, start : start + n] = row["topk_ids"]
            logprobs[b, start : start + n] = row["topk_logprobs"]
            rest[b, start : start + n] = row["rest_logmass"]
            covered[b, start : start + n] = True
        if (mask[:, 1:] & ~covered[:, :-1]).any():  # a real token predicted from a pad: left padding
            raise ValueError(
                "the batch predicts a real token from a padding position (left padding), which the cache holds "
                "no teacher prediction for; pad on the right (tokenizer.padding_side = 'right')"
            )
        return TopK(ids=ids, logprobs=logprobs, rest=rest, covered=covered)
