"""cvfast's model definitions: transformer, VAE, text encoder, configs and weight loading."""
