"""Analyses of trained and train-free methods: the figures of the papers."""
