"""The search service (clip-retrieval's back-end API) and the exploration page, over the storage root's indices."""
