"""The cross-modal demo's report: accuracy per row (seeds), paired bootstrap intervals, speed, table and PNG."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from llmkd.atomic import atomic_write, write_json  # noqa: E402
from llmkd.data.collate import DistillationCollator  # noqa: E402
from llmkd.evaluation.intervals import percentile_interval, resample_indices  # noqa: E402
from llmkd.evaluation.speed import time_interleaved  # noqa: E402

RESAMPLES, REFERENCE = 2000, "supervised"


def interval_of_mean(correct: dict, row: str, reference: str | None) -> list[float]:
    """95% percentile bootstrap over clips of the row's accuracy, averaged over its seeds, minus the reference's
    (paired: the same resampled clips for every model; reference None: the row's own accuracy), in points."""
    indices = resample_indices(correct[row].shape[1], RESAMPLES, seed=0)  # (R, n)
    replicates = correct[row][:, indices].mean(-1).mean(0)  # (seeds, R, n) -> (R,)
    if reference is not None:
        replicates = replicates - correct[reference][:, indices].mean(-1).mean(0)
    return [100 * v for v in percentile_interval(replicates) or []]


def summary(results: dict, ceiling: list[int], labels: np.ndarray) -> dict:
    correct = {
        name: np.array([np.asarray(r["predictions"]) == labels for r in runs], dtype=float)
        for name, runs in results.items()
    }
    correct["teacher"] = (np.asarray(ceiling) == labels)[None].astype(float)
    out = {}
    for name, runs in results.items():
        scores = [100 * r["accuracy"] for r in runs]
        entry = {
            "seeds": scores,
            "mean": statistics.mean(scores),
            "sd": statistics.stdev(scores) if len(scores) > 1 else None,
        }
        entry["interval"] = interval_of_mean(correct, name, None)
        if name != REFERENCE and REFERENCE in results:
            entry["vs_supervised"] = 100 * (correct[name].mean() - correct[REFERENCE].mean())
            entry["vs_supervised_interval"] = interval_of_mean(correct, name, REFERENCE)
        entry["train_minutes"] = statistics.mean(r["train_minutes"] for r in runs)
        out[name] = entry
    teacher = 100 * correct["teacher"].mean()
    out["teacher (transcripts)"] = {
        "seeds": [teacher],
        "mean": teacher,
        "sd": None,
        "interval": interval_of_mean(correct, "teacher", None),
    }
    return out


@torch.inference_mode()
def speed(ctx: dict, name: str, batch_size: int = 16, batches: int = 4) -> dict:
    """ms per clip at batch `batch_size` (2 threads, interleaved rounds): the student on ready features, the
    feature extractor on raw audio, and the text teacher on the transcripts (for scale)."""
    from transformers import AutoModelForAudioClassification

    folder = next(p for p in sorted(ctx["out"].glob(f"{name}-seed*")) if (p / "config.json").is_file())
    model = AutoModelForAudioClassification.from_pretrained(folder).eval()
    collate = DistillationCollator(  # each stream padded with its own model's pad id, as in training
        ctx["extractor"],
        teacher_tokenizer=ctx["tokenizer"],
        config=model.config,
        teacher_config=ctx["teacher"].config,
    )
    rows = [ctx["validation"][i] for i in range(min(len(ctx["validation"]), batch_size * batches))]
    groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    ready = [collate(g) for g in groups]
    audio = [ctx["audio"][i : i + batch_size] for i in range(0, len(rows), batch_size)]
    extractor = ctx["extractor"]
    models = {
        "audio student": lambda i: model(
            input_features=ready[i]["input_features"], attention_mask=ready[i]["attention_mask"]
        ),
        "feature extraction": lambda i: [extractor(a, sampling_rate=16_000) for a in audio[i]],
        "text teacher": lambda i: ctx["teacher"](
            input_ids=ready[i]["teacher_input_ids"], attention_mask=ready[i]["teacher_attention_mask"]
        ),
    }
    timed = time_interleaved(models, list(range(len(groups))), rounds=10, warmup=1, threads=2)
    return {k: v["ms"] / batch_size for k, v in timed["models"].items()} | {
        "parameters": sum(p.numel() for p in model.parameters())
    }


def table(rows: dict, facts: dict, speeds: dict) -> str:
    lines = [
        "| row | what it learns from | accuracy (mean ± sd over seeds) | seeds | 95% interval | − supervised (paired 95%) | train min |",
        "|---|---|---|---|---|---|---|",
    ]
    what = {
        "supervised": "gold labels of the audio",
        "cross-modal KD": "teacher soft targets (no audio label)",
        "KD + features": "soft targets + pooled features",
        "teacher (transcripts)": "reads the text (ceiling)",
    }
    for name, e in rows.items():
        sd = f" ± {e['sd']:.1f}" if e["sd"] is not None else ""
        seeds = " / ".join(f"{s:.1f}" for s in e["seeds"])
        ci = "–".join(f"{v:.1f}" for v in e["interval"]) if e["interval"] else "n/a"
        delta = (
            f"{e['vs_supervised']:+.1f} ({', '.join(f'{v:+.1f}' for v in e['vs_supervised_interval'])})"
            if "vs_supervised" in e
            else ""
        )
        minutes = f"{e['train_minutes']:.1f}" if "train_minutes" in e else ""
        lines.append(
            f"| {name} | {what.get(name, '')} | {e['mean']:.1f}{sd} | {seeds} | {ci} | {delta} | {minutes} |"
        )
    lines += [
        "",
        f"Audio student: {speeds['parameters'] / 1e6:.2f}M parameters, {speeds['audio student']:.2f} ms per clip "
        f"on ready features + {speeds['feature extraction']:.2f} ms per clip of feature extraction (batch 16, 2 threads); "
        f"text teacher {speeds['text teacher']:.2f} ms per transcript.",
        f"Data: {facts['train_clips']} training clips ({facts['train_minutes_of_speech']:.0f} min of speech, voices "
        f"{', '.join(facts['train_voices'])}); {facts['validation_clips']} validation clips, held-out voices "
        f"{', '.join(facts['validation_voices'])}. Whole demo: {facts['minutes']:.1f} min.",
    ]
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(rows)
    for i, name in enumerate(names):
        e = rows[name]
        ax.bar(i, e["mean"], color="tab:gray" if name.startswith("teacher") else "tab:blue", alpha=0.6)
        ax.scatter([i] * len(e["seeds"]), e["seeds"], color="black", zorder=3, s=12)
        if e["interval"]:
            ax.errorbar(
                i,
                e["mean"],
                yerr=[[e["mean"] - e["interval"][0]], [e["interval"][1] - e["mean"]]],
                color="black",
                capsize=4,
            )
    ax.axhline(50, linestyle=":", color="red", label="chance")
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("accuracy on held-out voices (%)")
    ax.set_title("Spoken Rotten Tomatoes: audio students vs the text teacher")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(out: Path, results: dict, ceiling: list[int], validation, ctx: dict, facts: dict) -> str:
    labels = np.asarray(validation["label"])
    rows = summary(results, ceiling, labels)
    folder_name = "cross-modal-kd"
    speeds = speed(ctx, folder_name)
    text = (
        "# Cross-modal distillation: text teacher -> speech student\n\n" + table(rows, facts, speeds) + "\n"
    )
    atomic_write(out / "report.md", lambda h: h.write(text))
    write_json(str(out / "report.json"), {"rows": rows, "facts": facts, "speed_ms_per_clip": speeds})
    plot(rows, out / "cross_modal.png")
    return text
