"""Data curation: language ID, quality rules, exact and near dedup, PII redaction, toxicity, perplexity scoring and
decontamination, run over partitions of a corpus locally or on a Dask cluster (`lmforge curate`)."""
