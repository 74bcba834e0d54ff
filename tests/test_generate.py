"""`llmkd generate` end to end on tiny models, and distillation on what it wrote (recipe smoke tier)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    bert_config,
    llama_config,
    make_tokenizer,
    run_launcher,
    seeded,
)
from datasets import load_from_disk

from llmkd.cli import main


@pytest.fixture
def model_dirs(tmp_path):
    seeded(LlamaForCausalLM, llama_config(), 0).save_pretrained(tmp_path / "lm")
    make_tokenizer("llama").save_pretrained(tmp_path / "lm")
    config = bert_config(id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    seeded(BertForSequenceClassification, config, 0).save_pretrained(tmp_path / "cls")
    make_tokenizer("bert").save_pretrained(tmp_path / "cls")
    return tmp_path


def write(path, payload):
    path.write_text(yaml.safe_dump(payload))
    return str(path)


def test_generate_teacher_samples(model_dirs, tmp_path):
    recipe = write(
        tmp_path / "gen.yaml",
        {
            "method": "teacher_sampling",
            "teacher": str(model_dirs / "lm"),
            "output_dir": str(tmp_path / "synth"),
            "num_samples": 6,
            "max_new_tokens": 5,
            "batch_size": 2,
            "shard_size": 4,
            "progress_bar": False,
            "store_topk": 3,
        },
    )
    assert main(["generate", recipe, "--seed", "7"]) == 0
    data = load_from_disk(str(tmp_path / "synth" / "dataset"))
    assert len(data) == 6 and max(data["num_generated"]) <= 5
    assert json.loads((tmp_path / "synth" / "provenance.json").read_text())["seed"] == 7


def test_generate_zerogen_then_distil_on_the_synthetic_set(model_dirs, tmp_path):
    recipe = write(
        tmp_path / "zg.yaml",
        {
            "method": "zerogen",
            "teacher": str(model_dirs / "cls"),
            "generator": str(model_dirs / "lm"),
            "output_dir": str(tmp_path / "zg"),
            "num_candidates": 16,
            "batch_size": 4,
            "shard_size": 8,
            "max_new_tokens": 6,
            "progress_bar": False,
            "label_prompts": {"negative": "w1 w2", "positive": "w3 w4"},
            "balance": False,
            "deduplicate": False,
            "stop_strings": [],
        },
    )
    assert main(["generate", recipe]) == 0
    synthetic = tmp_path / "zg" / "dataset"
    assert len(load_from_disk(str(synthetic))) > 0
    distil = write(
        tmp_path / "distil.yaml",
        {
            "teacher": str(model_dirs / "cls"),
            "student_layers": [0, 3],
            "train_file": str(synthetic),
            "text_columns": ["text"],
            "hard_label_weight": 0.0,
            "output_dir": str(tmp_path / "student"),
            "max_steps": 2,
            "report_to": "none",
            "use_cpu": True,
        },
    )
    assert main(["distill", distil]) == 0  # the saved synthetic dataset is a valid train_file
    assert (tmp_path / "student" / "model.safetensors").is_file()


def test_generate_rejects_unknown_keys_before_loading_models(tmp_path, capsys):
    recipe = write(
        tmp_path / "bad.yaml",
        {
            "method": "teacher_sampling",
            "teacher": "nowhere",
            "output_dir": str(tmp_path / "x"),
            "num_sample": 3,
        },
    )
    assert main(["generate", recipe]) == 2
    assert "num_sample (did you mean num_samples?)" in capsys.readouterr().err


def mlm_dir(tmp_path):
    from test_gibbs import mlm_tokenizer, tiny_mlm

    tiny_mlm().save_pretrained(tmp_path / "mlm")
    mlm_tokenizer().save_pretrained(tmp_path / "mlm")
    return str(tmp_path / "mlm")


def gibbs_recipe(model_dirs, tmp_path, out):
    return write(
        tmp_path / "gibbs.yaml",
        {
            "method": "gibbs",
            "teacher": str(model_dirs / "cls"),
            "mlm": mlm_dir(tmp_path),
            "output_dir": str(out),
            "num_samples": 24,
            "min_length": 2,
            "max_length": 5,
            "sweeps": 2,
            "batch_size": 4,
            "shard_size": 4,
            "progress_bar": False,
            "balance": False,
        },
    )


def test_generate_gibbs_and_inversion_from_recipes(model_dirs, tmp_path, capsys):
    assert main(["generate", gibbs_recipe(model_dirs, tmp_path, tmp_path / "g")]) == 0
    data = load_from_disk(str(tmp_path / "g" / "dataset"))
    assert len(data) > 0 and data.column_names == ["sample_index", "text", "length", "teacher_probs", "label"]
    record = json.loads((tmp_path / "g" / "provenance.json").read_text())
    assert record["method"] == "gibbs" and record["generator"]["name_or_path"] == str(tmp_path / "mlm")
    inversion = {
        "method": "inversion",
        "teacher": str(model_dirs / "cls"),
        "output_dir": str(tmp_path / "inv"),
        "num_samples": 4,
        "steps": 3,
        "batch_size": 2,
        "diversity_group": 2,
        "shard_size": 2,
        "progress_bar": False,
        "balance": False,
    }
    assert main(["generate", write(tmp_path / "inv.yaml", inversion)]) == 0
    assert len(load_from_disk(str(tmp_path / "inv" / "dataset"))) == 4
    no_head = {
        **inversion,
        "method": "gibbs",
        "mlm": str(model_dirs / "cls"),
        "output_dir": str(tmp_path / "x"),
    }
    no_head.pop("diversity_group"), no_head.pop("steps")
    assert main(["generate", write(tmp_path / "nohead.yaml", no_head)]) == 2
    assert "has no trained masked-LM head" in capsys.readouterr().err
    assert main(["generate", write(tmp_path / "nomlm.yaml", {**no_head, "mlm": None})]) == 2
    assert "gibbs needs mlm" in capsys.readouterr().err


class Died(RuntimeError):
    pass


def test_rank_shards_resume_and_merge_equal_one_process(tmp_path, monkeypatch):
    """Ranks simulated in one process: rank 1 of 2 writes shards 1 and 3 and dies; rank 0 of 2 writes shard 0
    and dies in shard 2; a 1-process resume writes only shard 2, and the merge (token budget applied in index
    order) equals an uninterrupted 1-process run."""
    from test_synthesis import lm_config

    from llmkd.data.synthesis import io, sampling

    model = seeded(LlamaForCausalLM, llama_config(), 0)
    tok = make_tokenizer("llama")
    kw = {"num_samples": 16, "max_new_tokens": 6, "greedy_tokens": 1}
    whole = [dict(r) for r in sampling.sample_teacher(model, tok, lm_config(tmp_path, "whole", **kw))]
    budget = sum(r["num_generated"] for r in whole[:10]) + 1  # ends inside shard 2
    bounded = [
        dict(r)
        for r in sampling.sample_teacher(model, tok, lm_config(tmp_path, "b", max_total_tokens=budget, **kw))
    ]
    assert len(bounded) == 10
    config = lm_config(tmp_path, "ranks", max_total_tokens=budget, **kw)
    produced, real = [], sampling.sample_batch

    def spy(model, prompts, *args, **kwargs):
        produced.append(len(prompts))
        if rank[0] == 0 and len(produced) == 3:  # first batch of rank 0's second shard
            raise Died("killed")
        return real(model, prompts, *args, **kwargs)

    def barrier():
        raise Died("rank 1 lost its peer")  # rank 1 dies at the barrier, after its shards

    monkeypatch.setattr(sampling, "sample_batch", spy)
    rank = [1]
    monkeypatch.setattr(io, "process_group", lambda: (rank[0], 2))
    monkeypatch.setattr(io, "_barrier", barrier)
    with pytest.raises(Died):
        sampling.sample_teacher(model, tok, config)
    rank[0] = 0
    produced.clear()
    with pytest.raises(Died):
        sampling.sample_teacher(model, tok, config)
    shards = lambda n: json.loads((tmp_path / "ranks" / f"progress-rank-0000{n}.json").read_text())["shards"]  # noqa: E731
    assert [s["index"] for s in shards(1)] == [1, 3] and [s["index"] for s in shards(0)] == [0]
    monkeypatch.undo()
    produced.clear()
    monkeypatch.setattr(sampling, "sample_batch", lambda *a, **k: produced.append(1) or real(*a, **k))
    resumed = [dict(r) for r in sampling.sample_teacher(model, tok, config)]
    assert len(produced) == 2  # only shard 2 (two batches of 2) was generated again
    assert resumed == bounded
    progress = json.loads((tmp_path / "ranks" / "progress.json").read_text())
    assert progress["world_size"] == 1 and [s["rows"] for s in progress["shards"]] == [4, 4, 2]


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.multiprocess
def test_two_processes_write_their_own_shards_and_merge_to_the_one_process_dataset(model_dirs, tmp_path):
    import os
    import sys

    recipe = gibbs_recipe(model_dirs, tmp_path, tmp_path / "one")
    assert main(["generate", recipe]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "recipes" / "generate.py"), recipe, "--output_dir", str(tmp_path / "two")]
    done = run_launcher(cmd, clean=[tmp_path / "two"], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (
        load_from_disk(str(tmp_path / "one" / "dataset")),
        load_from_disk(str(tmp_path / "two" / "dataset")),
    )
    assert [dict(r) for r in two] == [dict(r) for r in one]
    ranks = [json.loads((tmp_path / "two" / f"progress-rank-0000{r}.json").read_text()) for r in (0, 1)]
    assert [[s["index"] for s in p["shards"]] for p in ranks] == [[0, 2, 4], [1, 3, 5]]  # both really worked
    assert json.loads((tmp_path / "two" / "provenance.json").read_text())["world_size"] == 2
