"""Layer maps: which student layer is compared with which teacher layer (TinyBERT's mapping function)."""

from __future__ import annotations

from typing import Any

MAP_NAMES = ("uniform", "last")


def check_shape(layer_map: Any, where: str) -> None:
    """'uniform', 'last' or a non-empty list of [student, teacher] integer pairs; else a ValueError naming it."""
    if layer_map in MAP_NAMES:
        return
    ok = isinstance(layer_map, (list, tuple)) and len(layer_map) > 0
    ok = ok and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in layer_map)
    ok = ok and all(isinstance(i, int) and not isinstance(i, bool) for p in layer_map for i in p)
    if not ok:
        raise ValueError(
            f"{where}: layer_map must be 'uniform', 'last' or a list of [student_layer, teacher_layer] "
            f"integer pairs, got {layer_map!r}"
        )


def freeze(layer_map: Any) -> Any:
    """A hashable copy (tuples of pairs) so that terms can be compared and used as keys."""
    if isinstance(layer_map, (list, tuple)):
        return tuple(tuple(p) for p in layer_map)
    return layer_map


def resolve(layer_map, n_student: int, n_teacher: int, kind: str) -> list[tuple[int, int]]:
    """Student↔teacher index pairs. Hidden states have L+1 entries (0 = embeddings), attention maps have L.

    'uniform' is TinyBERT's g(m) = m·L_T/L_S, embeddings to embeddings (Jiao et al. 2020, arXiv 1909.10351);
    'last' pairs the final entries. Explicit pairs are checked against both models (ValueError naming the range).
    """
    offset = 0 if kind == "attention" else 1  # hidden_states carries the embedding output first
    top_s, top_t = n_student - 1 + offset, n_teacher - 1 + offset
    if layer_map == "last":
        return [(top_s, top_t)]
    if layer_map == "uniform":
        if kind == "attention":
            return [(j, round((j + 1) * n_teacher / n_student) - 1) for j in range(n_student)]
        return [(i, round(i * n_teacher / n_student)) for i in range(n_student + 1)]
    what = "attention maps" if kind == "attention" else "hidden_states (0 = embeddings)"
    for s, t in layer_map:
        for role, idx, top in (("student", s, top_s), ("teacher", t, top_t)):
            if not 0 <= idx <= top:
                raise ValueError(
                    f"{kind} layer_map pair [{s}, {t}]: {role} index {idx} is out of range; the {role} has "
                    f"{top + 1} {what}, valid indices 0..{top}"
                )
    return [tuple(p) for p in layer_map]
