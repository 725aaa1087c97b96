"""Pure functions from probabilities, labels and trajectories to per-example scores.

scores.py    confidence, margin, entropy, kNN disagreement, hardness, label issues, metrics
dynamics.py  training dynamics: cartography, AUM, forgetting events
"""
