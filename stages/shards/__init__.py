"""Shard I/O (layout: docs/SCHEMA.md). Writing: the output folder on any filesystem
(output), the per-task spool (spool), the shard tar and its stats (writer), the end of a
build (consolidate), one build per folder (lock). The index and reading: names and
orders (layout), manifest and completion markers (manifest), samples out of a tar
(reader)."""
