"""The `shard` stage's entry point; its code is the package droppos.shard (see there)."""

from droppos.shard import run, verify

__all__ = ["run", "verify"]
