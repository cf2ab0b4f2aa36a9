"""The generative models, one folder each: vq -> ra_cm3 -> fromage -> gill."""
