"""The offline demo: build a memory, search, generate and chat, and write an HTML report."""
