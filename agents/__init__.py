"""The learned defense (ONP): a GNN pruning policy for sb3-contrib's MaskablePPO (agents.policy over
agents.features and agents.gnn), trained on shadow models (agents.train, with the oracle expert of
agents.expert as an optional warm start), saved without pickle (agents.io) and deployed as the
registered defense `onp` (agents.defense)."""
