"""Training: the loop, resume, reliability, speed switches, scale-out."""
