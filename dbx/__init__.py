"""dbx: train PyTorch models with an adaptive batch size, and record every run in MLflow.

Importing dbx is cheap on purpose: torch and mlflow are imported only by the commands that need
them, so ``dbx --help`` and ``dbx validate`` answer at once.
"""
__version__ = "0.1.0"
