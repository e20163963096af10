"""The DuckDB registry: schema, migrations, writes, read-only queries."""

from medsae.registry.db import Registry, RegistryLockedError, insert_rows, registry_path

__all__ = ["Registry", "RegistryLockedError", "insert_rows", "registry_path"]
