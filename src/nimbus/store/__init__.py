"""Metadata storage (DESIGN §7): SQLAlchemy Core tables, one repository class, Alembic migrations.

``Store`` is the only way in; the records it returns are plain dataclasses::

    store = await Store.open("sqlite:///.nimbus/nimbus.db")   # or postgresql://…; migrates on open
    fn = await store.get_function("hello")
    await store.close()
"""

from nimbus.store.records import ApiKeyRecord, BuildRecord, FunctionRecord, InvocationRecord, VersionRecord
from nimbus.store.repository import Store

__all__ = ["ApiKeyRecord", "BuildRecord", "FunctionRecord", "InvocationRecord", "Store", "VersionRecord"]
