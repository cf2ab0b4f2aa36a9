"""GILL: image tokens, a mapper into RA-CM3, a retrieve-or-generate decision (Koh et al. 2023)."""
