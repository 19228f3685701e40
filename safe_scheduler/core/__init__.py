"""Runs one component on the layers below, top to bottom, as gunicorn's arbiter does. Imports
``components`` and everything below it."""
