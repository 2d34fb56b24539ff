"""Quality metrics, alignment/confidence analyses, plots and reports."""
