"""Evaluation: odd-one-out metrics with intervals (metrics), the data they score (levels, rsa), the models under
evaluation (subjects, savedmodel), one function per analysis (analyses, probing, representation), and the
rendering of the report (report)."""
