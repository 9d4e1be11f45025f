"""Training: one epoch (loop.py), the optimiser and LR schedule (optim.py), the rounds (rounds.py)."""
