"""Reports of a run: tables computed from metrics.jsonl, Markdown with PNG plots."""
