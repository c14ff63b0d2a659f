"""Tools that rebuild the tiny world's committed assets (outside the installed library; `python -m tools.tiny_world`)."""
