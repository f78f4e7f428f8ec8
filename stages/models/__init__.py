"""The models a build runs on JPEGs before annotation: BLIP captions (captioner), CLIP
image-caption scores (clip_score), VAE latents (latents). Each loads once per worker."""
