"""Data-free distillation data: synthesise the transfer set from the teacher (Gou et al. 2021, section 5.5).

- `sample_teacher(teacher, tokenizer, SamplingConfig(...))`: sequences sampled from a causal-LM teacher
  (LLM-QAT random-token starts or Magpie chat-template starts), optionally with its top-k log-probs.
- `zerogen_dataset(teacher, tokenizer, generator, ZeroGenConfig(...))`: a generator LM writes label-prompted text, the
  classifier teacher soft-labels it, filters keep the good part (ZeroGen), optionally mined for a student.
- `gibbs_dataset(teacher, tokenizer, mlm, mlm_tokenizer, GibbsConfig(...))`: Gibbs sampling from a masked LM
  (Wang & Cho 2019), labelled and filtered like ZeroGen.
- `inversion_dataset(teacher, tokenizer, InversionConfig(...))`: EXPERIMENTAL, input embeddings optimised
  towards each class (DeepInversion's idea) and projected to their nearest tokens.

All write resumable shards (one set per process under torchrun / accelerate) and finally a `datasets` dataset plus provenance.json under config.output_dir."""

__all__ = [
    "METHODS",
    "GibbsConfig",
    "InversionConfig",
    "SamplingConfig",
    "ZeroGenConfig",
    "derive_seed",
    "gibbs_dataset",
    "inversion_dataset",
    "sample_teacher",
    "zerogen_dataset",
]

_HOMES = {
    "SamplingConfig": "sampling",
    "sample_teacher": "sampling",
    "ZeroGenConfig": "zerogen",
    "zerogen_dataset": "zerogen",
    "derive_seed": "common",
    "GibbsConfig": "gibbs",
    "gibbs_dataset": "gibbs",
    "InversionConfig": "inversion",
    "inversion_dataset": "inversion",
}


def __getattr__(name):
    # Lazy, so that importing llmkd.data.synthesis does not pay for torch / datasets until a method is used.
    import importlib

    if name == "METHODS":
        from llmkd.data.synthesis import gibbs, inversion, sampling, zerogen

        # method name -> (config class, function); the CLI picks one by the recipe's `method` key.
        return {
            "teacher_sampling": (sampling.SamplingConfig, sampling.sample_teacher),
            "zerogen": (zerogen.ZeroGenConfig, zerogen.zerogen_dataset),
            "gibbs": (gibbs.GibbsConfig, gibbs.gibbs_dataset),
            "inversion": (inversion.InversionConfig, inversion.inversion_dataset),
        }
    if name in _HOMES:
        return getattr(importlib.import_module(f"llmkd.data.synthesis.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'llmkd.data.synthesis' has no attribute {name!r}")
