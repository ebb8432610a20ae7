"""The teacher side: image sources, the embeddings store, and the affine alignment fitted to human soft labels."""
