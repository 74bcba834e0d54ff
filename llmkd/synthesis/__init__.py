"""Data-free distillation data: synthesise the transfer set from the teacher (Gou et al. 2021, section 5.5).

- `sample_teacher(teacher, tokenizer, SamplingConfig(...))`: sequences sampled from a causal-LM teacher
  (LLM-QAT random-token starts or Magpie chat-template starts), optionally with its top-k log-probs.
- `zerogen_dataset(teacher, tokenizer, generator, ZeroGenConfig(...))`: a generator LM writes label-prompted text, the
  classifier teacher soft-labels it, filters keep the good part (ZeroGen), optionally mined for a student.

Both write resumable shards and finally a `datasets` dataset plus provenance.json under config.output_dir."""

__all__ = ["METHODS", "SamplingConfig", "ZeroGenConfig", "derive_seed", "sample_teacher", "zerogen_dataset"]

_HOMES = {
    "SamplingConfig": "sampling",
    "sample_teacher": "sampling",
    "ZeroGenConfig": "zerogen",
    "zerogen_dataset": "zerogen",
    "derive_seed": "common",
}


def __getattr__(name):
    # Lazy, so that importing llmkd.synthesis does not pay for torch / datasets until a method is used.
    import importlib

    if name == "METHODS":
        from llmkd.synthesis import sampling, zerogen

        # method name -> (config class, function); the CLI picks one by the recipe's `method` key.
        return {
            "teacher_sampling": (sampling.SamplingConfig, sampling.sample_teacher),
            "zerogen": (zerogen.ZeroGenConfig, zerogen.zerogen_dataset),
        }
    if name in _HOMES:
        return getattr(importlib.import_module(f"llmkd.synthesis.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'llmkd.synthesis' has no attribute {name!r}")
