"""The kNN index stage: autofaiss indices over a crawl's embeddings, their memory-mapped metadata, merging crawls'
indices into one, and searching them (what the search service in `laion_assets/serve/` calls)."""
