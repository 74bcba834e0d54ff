"""`llmkd export STUDENT_DIR --onnx [--quantize int8]`: a trained classifier as an ONNX Runtime folder.

Imports torch, transformers and onnxruntime only after the arguments are read, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

QUANTIZE = ("int8",)  # llmkd.export.onnx.QUANTIZE, repeated here so that --help imports nothing heavy


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(
        prog="llmkd export",
        description=(
            "Export a trained sequence classifier (the output_dir of `llmkd distill` / `llmkd finetune`) to ONNX "
            "for CPU deployment with ONNX Runtime, and check that it predicts what PyTorch does. Writes "
            "model.onnx (+ model_int8.onnx), config, tokenizer and llmkd_export.json (opset, inputs, source "
            "hash, agreement) to --out. Time it beside PyTorch with "
            '`llmkd eval --checkpoints teacher=DIR "student, ONNX Runtime=DIR/onnx"`.'
        ),
    )
    out.add_argument(
        "student_dir", metavar="STUDENT_DIR", help="a *ForSequenceClassification checkpoint folder"
    )
    out.add_argument("--onnx", action="store_true", help="export to ONNX (the one format so far; required)")
    out.add_argument(
        "--quantize",
        help=f"also write a dynamically quantised model: one of {list(QUANTIZE)} (weights of linear layers)",
    )
    out.add_argument("--out", help="output folder (default: STUDENT_DIR/onnx)")
    out.add_argument(
        "--validation_file",
        help="csv/tsv/json/jsonl/parquet to check agreement on (default: the validation file recorded with "
        "the checkpoint, else built-in sentences)",
    )
    out.add_argument(
        "--text_columns", nargs="+", help="text column(s) of the file (default: sentence or text)"
    )
    out.add_argument("--label_column", help="gold labels, for the accuracy drop (default: label, if present)")
    out.add_argument("--max_samples", type=int, help="check on the first N rows only")
    out.add_argument(
        "--max_length", type=int, help="truncate inputs to N tokens (default: as trained, from the tokenizer)"
    )
    out.add_argument("--batch_size", type=int, default=32, help="batch size of the check")
    out.add_argument(
        "--atol", type=float, default=1e-4, help="largest |logit difference| allowed for the float32 export"
    )
    return out


def _check(args: argparse.Namespace) -> None:
    if not args.onnx:
        raise ValueError("choose an export format: llmkd export STUDENT_DIR --onnx [--quantize int8]")
    if args.quantize is not None and args.quantize not in QUANTIZE:
        raise ValueError(f"--quantize {args.quantize!r} is not supported: choose one of {list(QUANTIZE)}")
    for name in ("max_samples", "max_length", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if not args.atol > 0:
        raise ValueError(f"--atol must be > 0, got {args.atol}")
    if not os.path.isdir(args.student_dir):
        raise FileNotFoundError(f"STUDENT_DIR {args.student_dir!r} is not a folder")


def summary(manifest: dict, out_dir: str) -> str:
    """A few lines for the terminal: files, and each model's agreement with PyTorch."""
    lines = [f"wrote {out_dir}: {', '.join(manifest['files'])}, config, tokenizer, llmkd_export.json"]
    check = manifest["check"]
    lines.append(f"checked on {check['data']} ({check['fp32']['examples']} examples):")
    for name, figures in ((n, check[n]) for n in ("fp32", "int8") if n in check):
        parts = [f"max |logit diff| {figures['max_abs_logit_diff']:.2g}"]
        if "agreement" in figures:
            parts.append(f"top-1 agreement {100 * figures['agreement']:.2f}%")
        if "accuracy" in figures:
            parts.append(
                f"accuracy {100 * figures['accuracy']:.2f}% (PyTorch {100 * figures['accuracy_pytorch']:.2f}%)"
            )
        lines.append(f"  {name}: " + ", ".join(parts))
    lines += [f"warning: {w}" for w in manifest["warnings"]]
    lines.append(f"export took {manifest['export_seconds']:.1f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _check(args)
    from llmkd.export.onnx import export_onnx

    manifest = export_onnx(
        args.student_dir,
        args.out,
        args.quantize,
        validation_file=args.validation_file,
        text_columns=args.text_columns,
        label_column=args.label_column,
        max_length=args.max_length,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        atol=args.atol,
    )
    out_dir = args.out or os.path.join(args.student_dir, "onnx")
    print(summary(manifest, out_dir))
    return 0
