"""Spoken sentences from a speech synthesiser, offline: espeak-ng (a system package: `apt-get install espeak-ng`).

Each sentence is spoken with its own voice, pitch and speed, drawn from a generator seeded with (seed, the
sentence's index), so the audio is not one fixed waveform per word and a sentence always gets the same audio.
Voices are split in two disjoint groups (`TRAIN_VOICES`, `HELD_OUT_VOICES`) so that a validation split can be
spoken by voices never heard in training. Clips are resampled to `SAMPLE_RATE` (16 kHz, what transformers' speech
feature extractors expect) with scipy's polyphase filter and stored as float32 in safetensors, one shard per call,
named by the content hash of everything that decides the audio (texts, voices, seed, espeak-ng's version): a
second call with the same inputs reads the stored shard instead of synthesising again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly

from llmkd.atomic import write_json

SAMPLE_RATE = 16_000
# espeak-ng voice + variant names; the two groups share no voice.
TRAIN_VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-scotland", "en-us+m3", "en-gb-x-rp+f2")
HELD_OUT_VOICES = ("en-gb-x-gbclan+f4", "en-us+m5")
PITCH = (30, 70)  # espeak-ng -p, 0-99
SPEED = (140, 190)  # espeak-ng -s, words per minute


def espeak() -> str:
    """The espeak-ng executable. Raises FileNotFoundError with the install command when it is missing."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise FileNotFoundError("espeak-ng is not installed: run `apt-get install -y espeak-ng` (as root)")
    return path


def espeak_version() -> str:
    return subprocess.run([espeak(), "--version"], capture_output=True, text=True, check=True).stdout.strip()


def voice_settings(n: int, seed: int, voices: Sequence[str] = TRAIN_VOICES) -> list[dict]:
    """One {voice, pitch, speed} per sentence, drawn from numpy's PCG64 seeded with (seed, index)."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        out.append(
            {
                "voice": voices[int(rng.integers(len(voices)))],
                "pitch": int(rng.integers(PITCH[0], PITCH[1] + 1)),
                "speed": int(rng.integers(SPEED[0], SPEED[1] + 1)),
            }
        )
    return out


def speak(text: str, voice: str, pitch: int, speed: int) -> np.ndarray:
    """One clip: float32 samples in [-1, 1] at SAMPLE_RATE. Raises RuntimeError when espeak-ng fails."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "clip.wav")
        command = [espeak(), "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", path, "--", text]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.isfile(path):
            raise RuntimeError(f"espeak-ng failed on {text[:60]!r} with voice {voice}: {done.stderr.strip()}")
        rate, samples = wavfile.read(path)
    audio = samples.astype(np.float32) / 32768.0 if samples.dtype == np.int16 else samples.astype(np.float32)
    divisor = np.gcd(SAMPLE_RATE, rate)
    return resample_poly(audio, SAMPLE_RATE // divisor, rate // divisor).astype(np.float32)


def synthesise(
    texts: Sequence[str], cache_dir: str, seed: int = 0, voices: Sequence[str] = TRAIN_VOICES
) -> dict:
    """{"audio": [float32 arrays], "settings": [{voice, pitch, speed}], "key": content hash, "path": shard}.

    Reads OUT/speech-KEY.safetensors when it exists; otherwise synthesises every clip, then writes the shard
    and its JSON manifest atomically. Raises FileNotFoundError without espeak-ng."""
    from safetensors.numpy import load_file, save_file

    settings = voice_settings(len(texts), seed, voices)
    key = _key(texts, settings)
    path = os.path.join(cache_dir, f"speech-{key}.safetensors")
    if os.path.isfile(path):
        stored = load_file(path)
        audio = [stored[f"clip_{i}"] for i in range(len(texts))]
        return {"audio": audio, "settings": settings, "key": key, "path": path}
    audio = [speak(text, **s) for text, s in zip(texts, settings)]
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp"
    save_file({f"clip_{i}": a for i, a in enumerate(audio)}, tmp)
    os.replace(tmp, path)
    seconds = float(sum(len(a) for a in audio) / SAMPLE_RATE)
    write_json(path.replace(".safetensors", ".json"), {"key": key, "clips": len(audio), "seconds": seconds})
    return {"audio": audio, "settings": settings, "key": key, "path": path}


def _key(texts: Sequence[str], settings: list[dict]) -> str:
    payload = json.dumps({"texts": list(texts), "settings": settings, "espeak": espeak_version()})
    payload += f"|rate={SAMPLE_RATE}"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
