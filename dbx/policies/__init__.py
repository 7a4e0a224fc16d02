"""Batch-size policies: pure Python rules that pick each epoch's batch size.

Each built-in is registered in dbx's setup.cfg under the ``dbx.policies`` entry-point group,
exactly like a third-party policy; see ``dbx.protocols.BatchSizePolicy`` for the contract.
"""
