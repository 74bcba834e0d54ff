"""`llmkd generate` and `llmkd cache-teacher` killed with SIGKILL, then run again with the same command: the run
resumes, and its dataset / cache equals an uninterrupted run's.

A forked copy of the test process runs the command and SIGKILLs itself at an injected point: while the teacher
works, halfway through writing a shard, halfway through progress.json / manifest.json (the half is on disk,
flushed), after the final dataset was saved but before it replaced the old one, halfway through provenance.json.
One more run per command is a real `kill -9` from outside, at whatever the process was doing
(tests/faults_worker.py slows the teacher down so that the kill lands mid-run).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import LlamaForCausalLM, llama_config, make_tokenizer, seeded, sentences
from datasets import load_from_disk
from safetensors import safe_open
from safetensors.torch import load_file

from llmkd import atomic
from llmkd.cli import main
from llmkd.data.synthesis import sampling, shards
from llmkd.teachers.cached import writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny causal-LM teacher, text data, the two recipes and each command's uninterrupted result."""
    root = tmp_path_factory.mktemp("faults")
    seeded(LlamaForCausalLM, llama_config(), 0).save_pretrained(root / "lm")
    make_tokenizer("llama").save_pretrained(root / "lm")
    for split, n in (("train", 10), ("validation", 4)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(n, n)))
    generate = {"method": "teacher_sampling", "teacher": str(root / "lm"), "num_samples": 12, "shard_size": 4}
    generate |= {"batch_size": 2, "max_new_tokens": 4, "store_topk": 2, "progress_bar": False, "seed": 3}
    cache = {"teacher": str(root / "lm"), "student_config": {"num_hidden_layers": 1}, "max_length": 16}
    cache |= {"train_file": str(root / "train.jsonl"), "validation_file": str(root / "validation.jsonl")}
    cache |= {"cache_top_k": 4, "cache_rows_per_shard": 3, "cache_batch_size": 2, "temperature": 2.0}
    cache |= {
        "hard_label_weight": 0.0,
        "output_dir": str(root / "unused"),
        "use_cpu": True,
        "report_to": "none",
    }
    for name, values in (("generate", generate), ("cache", cache)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(values))
    assert main(command(root, "generate", root / "reference-generate")) == 0
    assert main(command(root, "cache", root / "reference-cache")) == 0
    return root


def command(root, which, out) -> list[str]:
    if which == "generate":
        return ["generate", str(root / "generate.yaml"), "--output_dir", str(out)]
    return ["cache-teacher", str(root / "cache.yaml"), "--teacher_cache", str(out)]


# ---- dying on purpose (in the forked child only) ----------------------------------------------------------------


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def on_call(function, number: int):
    """`function`, except that its `number`-th call kills the process first."""
    calls = [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == number:
            die()
        return function(*args, **kwargs)

    return dying


def half_written(name: str, number: int = 1):
    """llmkd.atomic.atomic_write, except that the `number`-th write of a file called `name` puts half its bytes
    into the temporary file, flushes them to disk and kills the process."""
    real, calls = atomic.atomic_write, [0]

    def write(path, content, mode="w"):
        calls[0] += os.path.basename(path) == name
        if os.path.basename(path) != name or calls[0] != number:
            return real(path, content, mode)

        def half(handle):
            buffer = io.BytesIO() if "b" in mode else io.StringIO()
            content(buffer)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            die()

        return real(path, half, mode)

    return write


def saved_then_killed(real):
    def save(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        die()  # dataset.tmp is complete, dataset/ not yet replaced, progress.json not yet "saved"

    return save


def kill_shard_work():
    sampling.sample_batch = on_call(sampling.sample_batch, 3)  # first batch of shard 1


def kill_shard_write():
    shards.atomic_write = half_written("shard-00001.jsonl")


def kill_progress_write():
    atomic.atomic_write = half_written("progress.json", 3)  # fresh, shard 0, then shard 1's record


def kill_dataset_save():
    import datasets

    datasets.Dataset.save_to_disk = saved_then_killed(datasets.Dataset.save_to_disk)


def kill_provenance_write():
    atomic.atomic_write = half_written("provenance.json")


def kill_cache_work():
    writer._shard_tensors = on_call(writer._shard_tensors, 2)


def kill_cache_shard_write():
    writer.atomic_write = half_written("shard-00001.safetensors")


def kill_manifest_write():
    atomic.atomic_write = half_written("manifest.json")


def run_and_die(inject, argv):
    inject()
    main(argv)
    os._exit(0)  # not reached when the injection fires: the parent checks for SIGKILL


def killed(inject, argv) -> None:
    child = multiprocessing.get_context("fork").Process(target=run_and_die, args=(inject, argv))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL, f"{inject.__name__}: the child ended with {child.exitcode}"


# ---- what must be equal -------------------------------------------------------------------------------------


def same_dataset_folder(done, reference) -> None:
    """Same files; shards byte for byte; the Arrow tables equal; provenance and progress equal but for times."""
    assert sorted(os.listdir(done)) == sorted(os.listdir(reference))
    for name in sorted(os.listdir(reference)):
        if name.startswith("shard-"):
            assert (done / name).read_bytes() == (reference / name).read_bytes(), name
    a, b = (load_from_disk(str(d / "dataset")) for d in (done, reference))
    assert a.features == b.features and a.data.table.equals(b.data.table)
    times = ("created_at", "started_at", "updated_at")
    for name in ("provenance.json", "progress.json"):  # paths name the folder: compare as if in the reference
        a = json.loads((done / name).read_text().replace(str(done), str(reference)))
        b = json.loads((reference / name).read_text())
        assert {k: v for k, v in a.items() if k not in times} == {
            k: v for k, v in b.items() if k not in times
        }


def same_cache(done, reference) -> None:
    """Same files; the manifest equal; every shard's tensors and metadata equal."""
    assert sorted(os.listdir(done)) == sorted(os.listdir(reference))
    assert json.loads((done / "manifest.json").read_text()) == json.loads(
        (reference / "manifest.json").read_text()
    )
    for name in sorted(os.listdir(reference)):
        if name.endswith(".safetensors"):
            a, b = load_file(done / name), load_file(reference / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
            assert meta(done / name) == meta(reference / name)


def meta(path) -> dict:
    with safe_open(path, "pt") as handle:
        return handle.metadata()


def leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


# ---- the tests ------------------------------------------------------------------------------------------------

GENERATE_KILLS = [
    kill_shard_work,
    kill_shard_write,
    kill_progress_write,
    kill_dataset_save,
    kill_provenance_write,
]
CACHE_KILLS = [kill_cache_work, kill_cache_shard_write, kill_manifest_write]


@pytest.mark.parametrize("inject", GENERATE_KILLS, ids=lambda f: f.__name__)
def test_generate_killed_then_rerun_equals_an_uninterrupted_run(setup, tmp_path, inject):
    out = tmp_path / "generated"
    killed(inject, command(setup, "generate", out))
    if inject in (kill_shard_write, kill_progress_write, kill_provenance_write):
        assert leftovers(out), "the kill did not land inside a file"
    if inject is not kill_provenance_write:
        assert not (out / "provenance.json").exists()
    assert main(command(setup, "generate", out)) == 0
    same_dataset_folder(out, setup / "reference-generate")


@pytest.mark.parametrize("inject", CACHE_KILLS, ids=lambda f: f.__name__)
def test_cache_teacher_killed_then_rerun_equals_an_uninterrupted_run(setup, tmp_path, inject):
    out = tmp_path / "cache"
    killed(inject, command(setup, "cache", out))
    assert not (out / "manifest.json").exists()  # a reader refuses the folder until the rerun finishes it
    if inject is not kill_cache_work:
        assert leftovers(out), "the kill did not land inside a file"
    assert main(command(setup, "cache", out)) == 0
    same_cache(out, setup / "reference-cache")


@pytest.mark.parametrize("which", ["generate", "cache"])
def test_kill_9_from_outside_then_rerun(setup, tmp_path, which):
    """A real `kill -9` of the command's own process once its second shard is on disk."""
    out = tmp_path / which
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "LLMKD_TEST_SLOW": "0.3"}
    argv = [sys.executable, os.path.join(ROOT, "tests", "faults_worker.py"), *command(setup, which, out)]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second = "shard-00001.jsonl" if which == "generate" else "shard-00001.safetensors"
    deadline = time.monotonic() + 120
    while not (out / second).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    finished = "provenance.json" if which == "generate" else "manifest.json"
    assert not (out / finished).exists()  # it was killed mid-run
    assert main(command(setup, which, out)) == 0
    (same_dataset_folder if which == "generate" else same_cache)(out, setup / f"reference-{which}")


def test_the_comparisons_can_fail(setup, tmp_path):
    """Negative controls: another seed gives another dataset, another temperature another cache."""
    other = tmp_path / "other"
    assert main([*command(setup, "generate", other), "--seed", "4"]) == 0
    with pytest.raises(AssertionError):
        same_dataset_folder(other, setup / "reference-generate")
    assert main([*command(setup, "cache", tmp_path / "hot"), "--temperature", "3.0"]) == 0
    with pytest.raises(AssertionError):
        same_cache(tmp_path / "hot", setup / "reference-cache")
