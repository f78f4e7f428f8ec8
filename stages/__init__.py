"""Build stages, grouped by job; none imports pipeline/ (the executors and CLI).

    read/        listing, readers, http fetch
    transform/   decode and resize, aspect buckets, near-duplicates
    models/      captioner, CLIP score, VAE latents
    annotators/  one condition per module (`image -> condition image`)
    shards/      shard layout, writer, output folder, spool, lock, manifest, reader, consolidate
    steps/       the build's steps, one per file, each with its own typed settings
    work.py      ShardWork and Sample: the unit that flows through the steps
"""
