"""Training: the one skeleton (loop.py) and its tasks (classifier.py, obfuscator.py), the adversarial game
(game.py) they and re-sync share, and the re-sync algorithms (resync.py)."""
