"""llmkd.data.assets.speech: seeded voices, held-out voice groups, and synthesis with its content-hash cache.

The synthesis tests run only where espeak-ng is installed (`apt-get install espeak-ng`); the rest need nothing.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from llmkd.data.assets import speech

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
TEXTS = ["a truly moving film", "dull and far too long", "a truly moving film"]


def test_voice_settings_are_seeded_per_sentence_and_vary():
    first = speech.voice_settings(50, seed=1)
    assert first == speech.voice_settings(50, seed=1)
    assert first[:10] == speech.voice_settings(10, seed=1)  # a sentence's voice does not depend on the count
    assert first != speech.voice_settings(50, seed=2)  # control: another seed, other voices
    assert len({(s["voice"], s["pitch"], s["speed"]) for s in first}) > 40
    assert {s["voice"] for s in first} <= set(speech.TRAIN_VOICES)
    assert not set(speech.TRAIN_VOICES) & set(speech.HELD_OUT_VOICES)
    held = speech.voice_settings(20, seed=1, voices=speech.HELD_OUT_VOICES)
    assert {s["voice"] for s in held} <= set(speech.HELD_OUT_VOICES)


def test_a_missing_synthesiser_names_the_install_command(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y espeak-ng"):
        speech.espeak()


@needs_espeak
def test_synthesis_is_deterministic_cached_and_voice_dependent(tmp_path, monkeypatch):
    done = speech.synthesise(TEXTS, str(tmp_path), seed=0)
    audio = done["audio"]
    assert all(a.dtype == np.float32 and a.ndim == 1 and 0 < np.abs(a).max() <= 1 for a in audio)
    assert 0.5 < len(audio[0]) / speech.SAMPLE_RATE < 5  # seconds of a short phrase
    settings = done["settings"]
    assert settings[0] != settings[2]  # seed 0 gives the repeated text other settings (pitch and speed)...
    assert len(audio[0]) != len(audio[2]) or not np.allclose(audio[0], audio[2])  # ...so another waveform
    again = speech.speak(TEXTS[1], **settings[1])
    np.testing.assert_array_equal(again, audio[1])  # espeak-ng is deterministic for fixed settings
    monkeypatch.setattr(speech, "speak", lambda *a, **k: pytest.fail("synthesised again"))
    cached = speech.synthesise(TEXTS, str(tmp_path), seed=0)
    assert cached["key"] == done["key"] and all(np.array_equal(a, b) for a, b in zip(cached["audio"], audio))
    assert (
        speech._key(TEXTS, speech.voice_settings(3, seed=5)) != done["key"]
    )  # control: other voices, other key
