"""Raw image-caption data: the synthetic primitives dataset and readers for WebDataset/Parquet shards."""
