"""The project's Kedro pipelines; each folder holds wiring (pipeline.py) and thin nodes (nodes.py)."""
