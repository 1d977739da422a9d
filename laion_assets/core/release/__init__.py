"""The release stage: filtered metadata in LAION-5B's columns, crawl-wide image dedup, the release parts and their
manifest, the dataset statistics, and the removal lists that every rebuild applies."""
