"""Identity training: data (clips + embedding), latent cache, the recipe, and its Ray launcher."""
