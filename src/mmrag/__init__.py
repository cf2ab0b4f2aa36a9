"""mmrag: retrieval-augmented multimodal generation over a persistent multimodal memory."""

__version__ = "0.1.0"
