"""One module per CLI verb: a `Config` dataclass and `main(cfg)`; thin glue over the library."""
