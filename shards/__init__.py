"""Raw image folders to verified WebDataset or LMDB shard stores (see docs/store-format.md)."""
