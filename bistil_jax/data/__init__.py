"""Data: corpora, tokenisation, vocabulary trimming, MLM batches."""
