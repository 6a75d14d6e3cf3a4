"""LightningModules that wire encoders, memory banks and retrieval into fit/test loops."""
