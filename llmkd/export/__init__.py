"""Deployment formats for trained students: `llmkd export STUDENT_DIR --onnx [--quantize int8]`.

- `onnx.export_onnx`: a sequence classifier -> model.onnx (+ model_int8.onnx), config, tokenizer and a manifest;
- `validate`: the agreement check against PyTorch (validation set or built-in sentences);
- `llmkd.evaluation.onnx_runtime.OrtClassifier`: an exported model run by ONNX Runtime, usable wherever `llmkd eval` takes a model.

Nothing is imported here, so that `llmkd export --help` does not pay for torch or onnxruntime.
"""
