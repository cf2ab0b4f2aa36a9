"""What every trainer shares: the LR schedule, resumable state, torchrun, losses, flags."""
