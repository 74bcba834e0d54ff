"""Teacher-logit cache: written once by `llmkd cache-teacher`, read as a teacher source (docs/logit_cache.md)."""
