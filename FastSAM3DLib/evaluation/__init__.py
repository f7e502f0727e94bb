"""Evaluation: the official click-simulation protocols and Dice/IoU bookkeeping."""
