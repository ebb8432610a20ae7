"""The teacher side (embed and align stages): image sources, embedding blocks of images (embed_blocks), the
embeddings store (embeddings), THINGS objects' features (object_features), and the affine alignment fitted to
human soft labels (alignment) with its stored transform (transform)."""
