"""The upload page: pick a photo, see the answer (make ui)."""
