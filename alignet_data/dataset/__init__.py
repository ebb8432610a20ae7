"""The AligNet dataset (cluster, triplets and publish stages): k-means clusters (clustering), triplet sampling
(sampling), the stage's plan and blocks (triplet_plan, triplet_blocks), soft labelling (labelling, with the
compiled kernels), TFRecord/Parquet/npz shards (shards), and versioned publishing (publishing)."""
