"""Raw data sets -> WebDataset shards (`shards.py`) -> training batches (`stream.py`)."""
