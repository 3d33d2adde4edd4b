"""A shard store to batches on the device: readers, splitting, decoding, augmentation, loaders."""
