"""cvfast's model definitions: configs and presets, latent geometry, the transformer, the VAE and its
tiling, the text encoder."""
