"""Pure image transforms of a build: decode, validate and resize (decode), aspect-ratio
buckets (buckets), perceptual hashes and near-duplicate search (near_duplicates)."""
