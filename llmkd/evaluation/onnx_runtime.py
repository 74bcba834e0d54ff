"""An exported ONNX classifier run by ONNX Runtime, shaped like a transformers model where `llmkd eval` uses one.

`OrtClassifier(path)` takes a `model.onnx` file, or a folder holding one beside its config.json and tokenizer (what
`llmkd export` writes), and answers `model(input_ids=..., attention_mask=...).logits` as a float32 torch tensor,
so evaluation batches, tokenises and scores it exactly as it does the PyTorch checkpoint it came from.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch

MODEL_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
MANIFEST = "llmkd_export.json"
PYTORCH_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def onnx_file(source) -> str | None:
    """The .onnx file that `source` names (the file itself, or a folder's model.onnx when the folder holds no
    PyTorch weights), else None: a PyTorch checkpoint folder with an `onnx/` subfolder stays a PyTorch one."""
    if isinstance(source, torch.nn.Module):
        return None
    path = os.fspath(source)
    if path.endswith(".onnx"):
        return path
    if os.path.isfile(os.path.join(path, MODEL_FILE)) and not any(
        os.path.exists(os.path.join(path, name)) for name in PYTORCH_WEIGHTS
    ):
        return os.path.join(path, MODEL_FILE)
    return None


def session_options(threads: int | None = None):
    """ONNX Runtime options used for every timing and check: all graph optimisations (attention, LayerNorm and
    GELU fusions), `threads` intra-op threads (default: torch's count, so both run times get the same cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: the fusion notices are not for users
    return options


class OrtClassifier:
    """A sequence classifier exported to ONNX, run on CPU by ONNX Runtime.

    Attributes: `config` (the transformers config saved beside the .onnx file), `input_names` (what the graph
    takes: input_ids, attention_mask and, for BERT-style models exported with them, token_type_ids), `path`.
    Raises FileNotFoundError when the file or its config.json is missing.
    """

    device = torch.device("cpu")

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        self.path = onnx_file(path) or os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"no ONNX model at {self.path!r}: export one with `llmkd export STUDENT_DIR --onnx`"
            )
        self.folder = os.path.dirname(os.path.abspath(self.path))
        self.config = load_config(self.folder)
        self.session = ort.InferenceSession(
            self.path, session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **_ignored) -> SimpleNamespace:
        """Logits (B, C) float32 torch tensor for (B, L) ids; absent token_type_ids are zeros, as in BERT."""
        ids = _numpy(input_ids)
        given = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids) if attention_mask is None else _numpy(attention_mask),
            "token_type_ids": np.zeros_like(ids) if token_type_ids is None else _numpy(token_type_ids),
        }
        (logits,) = self.session.run(["logits"], {name: given[name] for name in self.input_names})
        return SimpleNamespace(logits=torch.from_numpy(logits))

    def to(self, device):
        """A no-op: the session runs on the CPU whatever device the PyTorch models of a comparison use."""
        return self

    def eval(self):
        return self

    def num_parameters(self) -> int:
        """The weights of the model: those of the checkpoint it was exported from (its manifest), else the
        elements of the graph's weight tensors (an int8 weight counts as one, like a float32; quantisation
        scales and zero points are not weights). The exporter stores equal tensors once (the zero biases of an
        untrained model), so the graph's count can fall short: the manifest comes first."""
        import json

        import onnx

        try:
            with open(os.path.join(self.folder, MANIFEST), encoding="utf-8") as handle:
                return int(json.load(handle)["source"]["parameters"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        kinds = {
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.BFLOAT16,
            onnx.TensorProto.INT8,
        }
        graph = onnx.load(self.path, load_external_data=False).graph
        return int(
            sum(
                np.prod(t.dims, dtype=np.int64)
                for t in graph.initializer
                if t.data_type in kinds and t.dims and not t.name.endswith(("_scale", "_zero_point"))
            )
        )


def load_config(folder: str):
    """The transformers config beside an exported model (FileNotFoundError naming the fix when absent)."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"{folder!r} has no config.json beside its .onnx file: export with `llmkd export STUDENT_DIR --onnx`, "
            "which saves the config and tokenizer there"
        )
    return AutoConfig.from_pretrained(folder)


def _numpy(value) -> np.ndarray:
    array = value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return array.astype(np.int64, copy=False)
