"""Deployment files, and the rehearsal that proves them (``python -m deploy.rehearse``)."""
