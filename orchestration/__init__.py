"""Building canvases for jobs, submission (CLI, Python API), summaries and reports."""
