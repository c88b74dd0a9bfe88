"""Evaluation of a pretrained encoder: feature extraction and caching, label subsets, kNN, linear probe,
fine-tuning, and export."""
