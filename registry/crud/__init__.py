"""Database operations, one module per resource; every function takes keyword arguments.

Functions that change state take the writer lock (``modelhash.registry._db.begin_write``),
write their audit event in the same transaction and commit once.
"""
