"""Data layer: sample tables, dataset readers, preparation, synthetic data, the datamodule."""
