"""What a teacher-logit cache was computed from, hashed so that a cache is only ever used for the same inputs.

Components: the teacher (a content hash of its files, `llmkd.content.teacher_key`), the teacher's compute dtype,
the tokenizer (`tokenizer_key`), every model-input column of every split (`data_key`), max_length, k,
temperature, the stored value dtype and the task. The fingerprint is the SHA-256 of their canonical JSON.
"""

from __future__ import annotations

import json
import logging

from llmkd.content import (  # noqa: F401 - the keys a cache is made of, re-exported for its readers and writers
    MODEL_INPUTS,
    UNRESOLVED,
    _sha,
    data_key,
    teacher_key,
    tokenizer_key,
)

logger = logging.getLogger(__name__)

FORMAT = "llmkd-teacher-cache"
VERSION = 2  # 2: whole-file teacher hashes, Hub snapshots, every model-input column (version-1 keys differ)
FIX = "re-run `llmkd cache-teacher RECIPE.yaml` with these settings (into a new teacher_cache folder)"


class CacheMismatchError(ValueError):
    """The cache does not belong to these inputs (or is damaged); the message names what differs and the fix."""


def fingerprint(components: dict) -> str:
    return _sha(json.dumps(components, sort_keys=True))


def _flat(components: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in components.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same(key: str, cached, now) -> bool:
    """Equal, or the same Hub id and revision where one side could not be resolved offline (logged)."""
    if cached == now:
        return True
    if key != "teacher" or not all(isinstance(v, str) and v.startswith("hub:") for v in (cached, now)):
        return False
    (name, _, a), (other, _, b) = cached.partition("#"), now.partition("#")
    if name != other or UNRESOLVED not in (a, b):
        return False
    logger.warning(
        "teacher %s is not in the local Hub cache on one side (cache %s, this run %s): its files cannot be "
        "compared, only its id and revision match; pin teacher_revision to a commit for an exact key",
        name,
        a[:12],
        b[:12],
    )
    return True


def check_components(expected: dict, cached: dict, where: str) -> None:
    """Raises CacheMismatchError naming every component (None = not checked) that differs from the cache's."""
    want, have = _flat(expected), _flat(cached)
    diffs = [
        f"{key}: cached {have.get(key, '(none)')!r}, now {value!r}"
        for key, value in want.items()
        if value is not None and not _same(key, have.get(key), value)
    ]
    if diffs:
        raise CacheMismatchError(
            f"the teacher cache {where} was built from other inputs — " + "; ".join(diffs) + f". Fix: {FIX}, "
            "or train with the settings the cache was built with"
        )
