"""Evaluation metrics: FID on a declared extractor, CIDEr-D, retrieval recall, reports."""
