"""The service layer: a bundle served over HTTP (FastAPI and uvicorn, an optional extra).

Requests are queued, batched with others of the same decode settings and
searched by the translator below; nothing here is imported unless
``seq2seq-serve`` runs, so the library does not need the web extras.
"""
