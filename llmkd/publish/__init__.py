"""A student folder ready to publish: model card, checkpoints that are complete or ignored, nothing pickled.

- ``card``: the model card (README.md) of an output folder (``write_model_card``), with ``measure``'s numbers;
- ``trainer``: ``SafeCheckpoints``, the mixin of every llmkd trainer (and ``FinetuneTrainer``);
- ``checkpoints``: completion markers, ``last_complete_checkpoint``, ``training_args.json``, pickle detection;
- ``state``: optimizer / scheduler / RNG states as safetensors + JSON.

Submodules are imported where used: ``llmkd.schemes`` needs only ``trainer`` and ``checkpoints``.
"""
