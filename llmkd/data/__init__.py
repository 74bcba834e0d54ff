"""Data: loading and tokenising (`loading`), the one padder (`collate`), GLUE (`glue`), offline assets from PyPI
(`assets`) and data-free synthesis of transfer sets (`synthesis`)."""
