"""One APIRouter per file: search, items, index, health, metrics."""
