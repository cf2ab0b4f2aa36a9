"""The VQ image tokenizer: images <-> a grid of discrete codes (model, data, train, evaluate)."""
