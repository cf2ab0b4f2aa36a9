"""RA-CM3: a retrieval-augmented decoder over text and image codes (Yasunaga et al. 2023)."""
