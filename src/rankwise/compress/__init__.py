"""Low-rank compression and low-rank training: layers are replaced, not adapted."""
