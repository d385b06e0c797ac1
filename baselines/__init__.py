"""Heuristic pruning defenses (MNP, ANP, RNP, BNP/AR, Fine-Pruning, CLP). Not built yet: see the project issues."""
