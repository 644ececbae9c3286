"""Evaluation beyond perplexity: probes of what compression breaks (copying, retrieval)."""
