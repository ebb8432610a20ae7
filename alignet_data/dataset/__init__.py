"""The AligNet dataset: k-means clusters, triplet sampling, soft labelling, shards, publishing."""
