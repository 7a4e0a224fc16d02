"""The training loop and what it needs: parts from the spec, devices, learning-rate rules.

``dbx.train.loop.fit`` is the one function to read; it never imports mlflow (it reports to a
tracker object the caller passes in).
"""
