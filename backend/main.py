"""ASGI entry point: ``uvicorn backend.main:app`` (settings from the environment)."""

import logging

from backend.app import create_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()
