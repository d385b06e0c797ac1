"""Learned pruning agents (GNN policy, SB3 training, deployment). Not built yet: see the project issues."""
