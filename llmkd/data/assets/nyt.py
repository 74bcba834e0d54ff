"""Real held-out English text for causal-LM perplexity: the New York Times editorial snippets of VADER.

The 5,190 sentences of 498 NYT opinion-news articles with human sentiment scores (Hutto & Gilbert, ICWSM 2014,
MIT licence) ship in the same ``vaderSentiment==3.3.2`` source distribution as the Rotten Tomatoes data
(``llmkd.data.assets.vader``), as ``nytEditorialSnippets_GroundTruth.txt`` inside the inner ``hutto_ICWSM_2014.tar.gz``.

What the file looks like (checked on the pinned copy): UTF-8, CRLF line ends, no newline after the last row,
tab-separated ``ID, MEAN-SCORE, TEXT`` where ID is ``<article>_<sentence>`` (``1_1`` .. ``500_9``), sentences of
1-77 words (90,600 words in all). Like the movie snippets, double quotes are written as two apostrophes. The
text is kept as it is: it is only used as held-out text, so nothing about it is rewritten.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
from pathlib import Path

from llmkd.data.assets.vader import (
    INNER_ARCHIVE_MEMBER,
    _read_member,
    _verify_sha256,
    download_vader_sdist,
    tsv_fields,
)

NYT_MEMBER = "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt"
NYT_SHA256 = "7d8fbcce7dde5d716da53e78f4ef4be6b706e9ef1e1d51887e6d0ad4b69cc27e"
NYT_ROWS = 5190
NYT_ARTICLES = 498  # IDs run 1..500; articles 281 and 400 are absent from the file


def nyt_bytes(sdist_path: str | os.PathLike) -> bytes:
    """The snippet file's bytes, read from the inner archive in memory (nothing is extracted to disk)."""
    sdist_path = Path(sdist_path)
    with tarfile.open(sdist_path, mode="r:gz") as outer:
        inner = _read_member(outer, INNER_ARCHIVE_MEMBER, str(sdist_path))
    with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as archive:
        return _read_member(archive, NYT_MEMBER, f"{sdist_path}!{INNER_ARCHIVE_MEMBER}")


def parse_nyt(data: bytes) -> list[dict]:
    """Rows {id, article, sentence, text, score} of the tab-separated file, in file order."""
    rows = []
    for number, line, fields in tsv_fields(data):
        try:
            article, sentence = (int(part) for part in fields[0].split("_"))
            score, text = float(fields[1]), fields[2].strip()
        except (IndexError, ValueError):
            raise ValueError(
                f"{NYT_MEMBER} line {number}: expected '<article>_<sentence><TAB>SCORE<TAB>TEXT', got {line!r}"
            ) from None
        if not text or not math.isfinite(score):
            raise ValueError(f"{NYT_MEMBER} line {number}: empty text or non-finite score: {line!r}")
        rows.append({"id": fields[0], "article": article, "sentence": sentence, "text": text, "score": score})
    return rows


def read_nyt_snippets(
    sdist_path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    expected_sha256: str | None = None,
) -> list[dict]:
    """Every NYT snippet as {id, article, sentence, text, score}, checksum-verified.

    ``sdist_path`` defaults to ``llmkd.data.assets.vader.download_vader_sdist(cache_dir)`` (pip, cached). The file's
    sha256 must equal ``expected_sha256`` (default: the pinned NYT_SHA256); a mismatch raises ValueError
    naming both checksums, before anything is parsed.
    """
    data = nyt_bytes(sdist_path or download_vader_sdist(cache_dir))
    _verify_sha256(data, expected_sha256 or NYT_SHA256, f"{NYT_MEMBER}")
    return parse_nyt(data)


def nyt_articles(rows: list[dict], max_articles: int | None = None) -> list[str]:
    """One text per article: its sentences in sentence order joined by spaces; articles in file order."""
    if max_articles is not None and max_articles < 1:
        raise ValueError(f"max_articles must be >= 1 or None, got {max_articles!r}")
    articles: dict[int, list[tuple[int, str]]] = {}
    for row in rows:
        articles.setdefault(row["article"], []).append((row["sentence"], row["text"]))
    texts = [" ".join(text for _, text in sorted(parts)) for parts in articles.values()]
    return texts[:max_articles] if max_articles is not None else texts
