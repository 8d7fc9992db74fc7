"""The web UI (``python -m lmpipe.ui``): runs, live training curves, comparisons, pipeline
report cards and a chat with any checkpoint, served from ``out_dir`` by a small FastAPI
app whose pages are static files shipped in ``static/``."""
