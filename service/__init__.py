"""albef.service: the search REST service (FastAPI on uvicorn). Torch-free.

``create_app(settings)`` in :mod:`albef.service.app` builds the application; ``albef serve`` runs it.
The retrieve-then-rerank logic is :mod:`albef.service.engine`, the micro-batcher
:mod:`albef.service.batching`, the settings :class:`albef.settings.Settings`.
"""
