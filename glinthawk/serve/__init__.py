"""``glinthawk serve``: OpenAI's Files, Batches and online completion endpoints in front of a cluster.

Each batch runs through the same submit/resume path as ``glinthawk submit``, so results are
spooled on Tier 1 while nobody listens and a restarted service picks every batch up where its
results file ends. See docs/SERVE.md.
"""
