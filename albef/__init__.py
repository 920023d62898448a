"""albef-search: image-text retrieval on ALBEF (ITC retrieval in FAISS, ITM re-ranking)."""

__version__ = "0.1.0"
